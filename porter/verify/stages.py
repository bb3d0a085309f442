"""Pipeline stages without a forward pass: a port built at pipeline_parallel_size > 1, stage by stage.

Aphrodite cannot run a forward pass on this CPU (its wheel has no CPU kernels), so its pipeline
parallelism is checked the way the structural check checks the rest: each stage is a process of
its own (gloo on the loopback, the engine's own ``initialize_model_parallel(1, pp)``), which builds
the port and the engine's native class under the engine's config, as its loader would on that
rank, and ``porter.verify.structure.compare_structure`` compares them there: the parameters the
stage holds (names and shapes), ``load_weights`` on the whole checkpoint filling every one of them
and returning their names (the other stages' tensors skipped), and the loaded values against the
native class's. Every stage must pass, and each must hold only its share: no stage holds the
whole model, and together they hold all of it.

    python -m porter.verify.stages PORT_DIR [--pp 2] [--json]

This executes the port (as ``porter verify`` does), never the HF source it came from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from porter.verify.inprocess import _free_port, build_with_config, engine_api, engine_config
from porter.verify.structure import compare_structure, find_port_class, make_checkpoint


@dataclass
class StagesReport:
    port: str
    pp: int
    stages: list[dict] = field(default_factory=list)  # each rank's StructureReport, as a dict
    whole_params: int = 0  # the port's parameters at pipeline_parallel_size 1
    errors: list[str] = field(default_factory=list)
    ok: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _stage(port_dir: Path, checkpoint: Path, rank: int, world: int, init: str) -> dict:
    """In a stage's own process: join the group, build and compare the port there."""
    info, cls = find_port_class(port_dir)
    api = engine_api(info.target)
    config = engine_config(info.target, checkpoint, cls)
    config.parallel_config.pipeline_parallel_size = world
    with api.set_current(config):
        api.init_distributed_environment(
            world_size=world, rank=rank, local_rank=rank, distributed_init_method=init, backend="gloo")
        api.initialize_model_parallel(1, world)
    report = compare_structure(info.target, checkpoint, cls, info.hf_architecture)
    port, _config = build_with_config(info.target, checkpoint, cls)  # the names the stage holds
    return {**report.to_dict(), "failures": report.failures(),
            "stage_params": sorted(n for n, _ in port.named_parameters())}


def _names(report: dict) -> set[str]:
    return set(report["stage_params"])


def check_stages(port_dir: Path, pp: int = 2, timeout: float = 900) -> StagesReport:
    """Run the ``pp`` stages of the port in ``pp`` processes and judge them together."""
    from porter.layout import PortInfo

    port_dir = Path(port_dir)
    info = PortInfo.load(port_dir)
    result = StagesReport(port=str(port_dir), pp=pp)
    with tempfile.TemporaryDirectory(prefix="porter-stages-") as tmp:
        ckpt = make_checkpoint(info.model_type, Path(tmp) / "ckpt", hf_architecture=info.hf_architecture)
        init = f"tcp://127.0.0.1:{_free_port()}"
        procs = [subprocess.Popen(
            [sys.executable, "-m", "porter.verify.stages", str(port_dir), "--stage", str(r), "--pp", str(pp),
             "--init", init, "--checkpoint", str(ckpt), "--out", f"{tmp}/stage{r}.json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(pp)]
        # the whole model (pp 1), for the names the stages must share out: a process of its own
        # group, started beside the stages (each is mostly its imports)
        whole = Path(tmp) / "whole.json"
        whole_proc = subprocess.Popen(
            [sys.executable, "-m", "porter.verify.stages", str(port_dir), "--stage", "0", "--pp", "1",
             "--init", f"tcp://127.0.0.1:{_free_port()}", "--checkpoint", str(ckpt), "--out", str(whole)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        whole_err = whole_proc.communicate(timeout=timeout)[1]
        for r, (p, err) in enumerate(zip(procs, errs)):
            out = Path(tmp) / f"stage{r}.json"
            if p.returncode != 0 or not out.is_file():
                result.errors.append(f"stage {r} of {pp} failed (exit {p.returncode}): {err.strip()[-800:]}")
                continue
            result.stages.append(json.loads(out.read_text()))
        if whole_proc.returncode != 0 or not whole.is_file():
            result.errors.append(f"the whole model (pp 1) failed (exit {whole_proc.returncode}): "
                                 f"{whole_err.strip()[-800:]}")
        else:
            whole_names = _names(json.loads(whole.read_text()))
            result.whole_params = len(whole_names)
    if result.errors:
        return result
    if any("pp" not in s["port_interfaces"] for s in result.stages):
        result.errors.append("the port does not declare SupportsPP: the engine refuses pipeline_parallel_size > 1")
    for r, s in enumerate(result.stages):
        for failure in s["failures"]:
            result.errors.append(f"stage {r}: {failure}")
        if _names(s) >= whole_names:
            result.errors.append(f"stage {r} holds every parameter of the whole model: it is not staged")
    held = set().union(*(_names(s) for s in result.stages))
    if missing := sorted(whole_names - held):
        result.errors.append(f"no stage holds {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    result.ok = not result.errors
    return result


def _format(r: StagesReport) -> str:
    lines = [f"[{'ok' if r.ok else 'FAIL'}] {r.port}: pipeline_parallel_size {r.pp}, "
             f"{r.whole_params} parameters in the whole model"]
    for i, s in enumerate(r.stages):
        lines.append(f"  stage {i}: {s['port_params']} parameters (native {s['native_params']}), "
                     f"{s['tensors_compared']} loaded tensors compared, equal: {s['tensors_equal']}")
    lines += [f"  - {e}" for e in r.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m porter.verify.stages", description=__doc__)
    ap.add_argument("port_dir", type=Path)
    ap.add_argument("--pp", type=int, default=2)  # (2 processes on this 2-core machine)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # one stage's process
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage is not None:
        args.out.write_text(json.dumps(_stage(args.port_dir, args.checkpoint, args.stage, args.pp, args.init)))
        return 0
    if args.pp < 2:
        print(f"porter verify (stages): bad --pp {args.pp}: a pipeline of 2 or more stages", file=sys.stderr)
        return 2
    result = check_stages(args.port_dir, args.pp)
    print(json.dumps(result.to_dict(), indent=2) if args.json else _format(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
