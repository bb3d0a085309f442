"""The plan: what the port is, decided once and sealed (model.py: the data the passes read;
planner.py: how it is decided; refusals.py: what is refused, each with a bad input)."""

from porter.plan.model import AttentionPlan, GateUpPlan, LinearPlan, PortPlan
from porter.plan.planner import Planner, build_plan

__all__ = ["AttentionPlan", "GateUpPlan", "LinearPlan", "PortPlan", "Planner", "build_plan"]
