"""Structural verification: build a port in-process on the CPU and compare it with the engine.

No engine is started and no forward pass runs. For one target engine (vLLM or Aphrodite) this
module builds a model class under that engine's own config objects, the way the engine's loader
would (porter.verify.inprocess), and checks what can be checked without kernels:

- the port's ``named_parameters()`` (names and shapes) equal the engine's native class for the
  same config (the native class is resolved through the engine's ``ModelRegistry``);
- ``load_weights`` on the checkpoint's safetensors returns every parameter name, and writes
  every element: parameters are filled with NaN before loading and none may remain;
- each loaded tensor equals the one the native class loads from the same checkpoint, which
  checks q/k/v and gate/up shard fusion numerically without a forward pass.

Engine state (the distributed groups) is process-wide and the two engines cannot share a
process, so callers that mix targets run one process per target: ``python -m
porter.verify.structure PORT_DIR [PORT_DIR ...] --json`` is that process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from porter.verify.inprocess import (
    StructureInputError,
    build_inprocess as build_inprocess,  # part of this module's interface too
    build_with_config,
    engine_api,
    engine_context,
    is_quantized,
    register_unknown,
    resolve_native,
)

# Why Aphrodite never runs forward here (issue 9): stated in every Aphrodite report.
APHRODITE_NO_FORWARD = (
    "forward not run: the aphrodite-engine wheel is a CUDA build without CPU attention "
    "kernels, and its engine dies in a Triton-only path on the CPU; only structure, "
    "weight loading and loaded values are checked"
)


# --------------------------------------------------------------------------------------------
# Checks.


@dataclass
class LoadCheck:
    """What ``load_weights`` did to one model."""

    returned: int = 0  # names in the returned set
    returned_none: bool = False  # load_weights returned None instead of a set
    not_returned: list[str] = field(default_factory=list)  # parameters missing from it
    unknown_returned: list[str] = field(default_factory=list)  # returned names not parameters
    unwritten: dict[str, float] = field(default_factory=dict)  # param -> fraction still NaN
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.returned_none
            and not self.not_returned
            and not self.unwritten
        )


@dataclass
class StructureReport:
    target: str
    checkpoint: str
    port_class: str  # module:qualname
    native_arch: str
    native_class: str | None = None
    native_missing: str | None = None  # why there is no native class to compare with
    port_params: int = 0
    native_params: int = 0
    only_in_port: list[str] = field(default_factory=list)
    only_in_native: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    params_equal: bool | None = None  # names and shapes; None when there is no native class
    port_load: LoadCheck = field(default_factory=LoadCheck)
    native_load: LoadCheck | None = None
    tensors_compared: int = 0
    tensors_differ: dict[str, float] = field(default_factory=dict)  # name -> max |port-native|
    tensors_equal: bool | None = None
    # the engine's interfaces (its supports_<name> predicates) each class satisfies
    port_interfaces: list[str] = field(default_factory=list)
    native_interfaces: list[str] = field(default_factory=list)
    interfaces_missing: list[str] = field(default_factory=list)  # native's, not the port's
    forward_run: bool = False
    forward_not_run_because: str | None = None  # Aphrodite: why (APHRODITE_NO_FORWARD)
    # Aphrodite, in a fresh process (porter.verify.aphrodite): its plugin loader registering
    # the port, and the port module importing. None when not checked (vLLM, or no port dir).
    plugin: Any = None  # aphrodite.PluginCheck
    port_import: Any = None  # aphrodite.ImportCheck
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # a given checkpoint that does not match the model (bad input, exit 2): tensor -> parameter
    checkpoint_faults: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def failures(self) -> list[str]:
        """One line per failed check (empty when ok)."""
        out = list(self.checkpoint_faults) + list(self.errors)
        if self.params_equal is False:
            out.append(
                f"parameters differ from {self.native_class}: only in port {self.only_in_port}, "
                f"only in native {self.only_in_native}, shapes {self.shape_mismatch}"
            )
        load = self.port_load
        if load.error:
            out.append(f"load_weights raised: {load.error}")
        if load.returned_none:
            out.append("load_weights returned None, not the set of loaded names")
        # a name the native class's load_weights leaves out too is the engine's (Aphrodite's FusedMoE
        # returns its experts' names without the `routed_experts` level), not the port's
        native = self.native_load.not_returned if self.native_load is not None else []
        if missing := [n for n in load.not_returned if n not in native]:
            out.append(f"load_weights did not return {missing}")
        if load.unwritten:
            out.append(f"parameters never written (fraction NaN): {load.unwritten}")
        if self.tensors_equal is False:
            out.append(f"loaded tensors differ from native's (max abs diff): {self.tensors_differ}")
        if self.port_import is not None:
            out += self.port_import.failures()
        if self.plugin is not None:
            out += self.plugin.failures()
        return out


# The interfaces a port can carry (the engine's supports_<name>): pipeline parallel, LoRA, EAGLE-3.
INTERFACES = ("pp", "lora", "eagle3")


def _interfaces(target: str, cls) -> list[str]:
    mod = importlib.import_module(f"{target}.model_executor.models.interfaces")
    return [n for n in INTERFACES if getattr(mod, f"supports_{n}")(cls)]


def _qualname(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def iter_safetensors(checkpoint_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every tensor of every ``*.safetensors`` file, in file order."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise StructureInputError(f"{checkpoint_dir}: no *.safetensors file")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, st.get_tensor(name)


def _load_and_check(target: str, model, config, checkpoint_dir: Path) -> LoadCheck:
    import torch

    check = LoadCheck()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            if p.is_floating_point():
                p.data.fill_(float("nan"))
    try:
        with engine_context(engine_api(target), config):
            returned = model.load_weights(iter_safetensors(checkpoint_dir))
    except Exception as e:  # noqa: BLE001 (reported: the rest of the report still counts)
        check.error = f"{type(e).__name__}: {e}"
        return check
    if returned is None:
        check.returned_none = True
    else:
        returned = set(returned)
        check.returned = len(returned)
        check.not_returned = sorted(set(params) - returned)
        check.unknown_returned = sorted(returned - set(params))
    for name, p in params.items():
        if p.is_floating_point() and p.numel():
            nan = int(torch.isnan(p.data).sum())
            if nan:
                check.unwritten[name] = round(nan / p.numel(), 6)
    return check


def _expected_tensors(checkpoint_dir: Path, hf_architecture: str) -> dict[str, tuple]:
    """name -> (shape, dtype) of what HF's model for the checkpoint's config.json saves (built on
    the meta device: no memory, no weights; tied parameters once, persistent buffers too)."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(checkpoint_dir))
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = getattr(transformers, hf_architecture)
    with torch.device("meta"):
        model = cls._from_config(cfg, dtype=dtype)
    out = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    persistent = {
        f"{mod_name}.{b}" if mod_name else b
        for mod_name, mod in model.named_modules()
        for b in mod._buffers
        if b not in mod._non_persistent_buffers_set
    }
    for n, b in model.named_buffers():
        if n in persistent:
            out[n] = (tuple(b.shape), b.dtype)
    return out


def checkpoint_faults(target: str, model, config, checkpoint_dir: Path, hf_architecture: str) -> list[str]:
    """Tensors missing from, extra in, or of the wrong shape or dtype in a given checkpoint, each
    naming the tensor and the port parameter it loads into (asked of the port's own
    ``load_weights``, one tensor at a time, after the load check: it may write into ``model``)."""
    import torch
    from safetensors import safe_open

    expected = _expected_tensors(checkpoint_dir, hf_architecture)
    present: dict[str, tuple] = {}
    where: dict[str, Path] = {}
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                sl = st.get_slice(name)
                present[name] = (tuple(sl.get_shape()), sl.get_dtype())
                where[name] = f
    torch_names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                   torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}

    def parameter_of(name: str, tensor) -> str:
        try:
            with engine_context(engine_api(target), config):
                got = model.load_weights([(name, tensor)])
        except Exception as e:  # noqa: BLE001 (what the port does with it is the finding)
            return f"no parameter: the port's load_weights raises {type(e).__name__}: {e}"
        got = sorted(got or [])
        return f"parameter {', '.join(got)}" if got else "no parameter: load_weights skips it"

    def zeros(name: str):
        shape, dtype = expected[name]
        return torch.zeros(shape, dtype=dtype)

    faults = []
    for name in sorted(set(expected) - set(present)):
        faults.append(f"checkpoint lacks tensor {name} ({parameter_of(name, zeros(name))})")
    for name in sorted(set(present) - set(expected)):
        with safe_open(str(where[name]), framework="pt") as st:
            tensor = st.get_tensor(name)
        faults.append(f"checkpoint has unexpected tensor {name} {list(present[name][0])} "
                      f"({parameter_of(name, tensor)})")
    for name in sorted(set(present) & set(expected)):
        (shape, dt), (want_shape, want_dt) = present[name], expected[name]
        want = torch_names.get(want_dt, str(want_dt))
        if shape != want_shape:
            faults.append(f"checkpoint tensor {name} has shape {list(shape)}, expected "
                          f"{list(want_shape)} ({parameter_of(name, zeros(name))})")
        elif dt != want:
            faults.append(f"checkpoint tensor {name} has dtype {dt}, expected {want} "
                          f"({parameter_of(name, zeros(name))})")
    return faults


def _shapes(model) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in model.named_parameters()}


def compare_structure(
    target: str, checkpoint_dir: Path, port_cls, native_arch: str, *, compare_values=True,
    check_checkpoint=False,
) -> StructureReport:
    """Build ``port_cls`` and the engine's native ``native_arch`` for the checkpoint's config,
    compare parameter trees, load the checkpoint into both and compare what was loaded."""
    t0 = time.time()
    checkpoint_dir = Path(checkpoint_dir)
    report = StructureReport(
        target=target,
        checkpoint=str(checkpoint_dir),
        port_class=_qualname(port_cls),
        native_arch=native_arch,
    )
    report.port_interfaces = _interfaces(target, port_cls)
    if target == "aphrodite":
        report.forward_not_run_because = APHRODITE_NO_FORWARD
        report.notes.append(APHRODITE_NO_FORWARD)
    # A config.json naming the port's own architecture must resolve before any ModelConfig.
    register_unknown(engine_api(target), checkpoint_dir, port_cls)

    native = None
    try:
        native_cls, why = resolve_native(target, checkpoint_dir, native_arch)
        if native_cls is None:
            report.native_missing = why
            report.notes.append(f"no native class to compare with: {why}")
        else:
            report.native_class = _qualname(native_cls)
            report.native_interfaces = _interfaces(target, native_cls)
            native, native_config = build_with_config(target, checkpoint_dir, native_cls)
    except Exception as e:  # noqa: BLE001 (reported; the port's own checks still run)
        report.errors.append(f"building the native class failed: {type(e).__name__}: {e}")

    try:
        port, port_config = build_with_config(target, checkpoint_dir, port_cls)
    except Exception as e:  # noqa: BLE001 (a port that does not build is a finding)
        report.errors.append(f"building the port failed: {type(e).__name__}: {e}")
        report.seconds = round(time.time() - t0, 3)
        return report
    _compare_params(report, port, native)
    if missing := [n for n in report.native_interfaces if n not in report.port_interfaces]:
        report.interfaces_missing = missing
        report.notes.append(f"the native class supports {missing}, the port does not")

    report.port_load = _load_and_check(target, port, port_config, checkpoint_dir)
    if native is not None and compare_values:
        report.native_load = _load_and_check(target, native, native_config, checkpoint_dir)
        if report.native_load.error is None and report.port_load.error is None:
            _compare_loaded(report, port, native)

    if check_checkpoint:  # a checkpoint the user gave: is it the one the model expects?
        try:
            report.checkpoint_faults = checkpoint_faults(
                target, port, port_config, checkpoint_dir, native_arch
            )
        except Exception as e:  # noqa: BLE001
            report.errors.append(f"checking the checkpoint failed: {type(e).__name__}: {e}")

    report.ok = not report.failures()
    report.seconds = round(time.time() - t0, 3)
    return report


def _compare_params(report: StructureReport, port, native) -> None:
    """The port's parameter names and shapes against the native class's (when there is one)."""
    port_shapes = _shapes(port)
    report.port_params = len(port_shapes)
    if native is None:
        return
    native_shapes = _shapes(native)
    report.native_params = len(native_shapes)
    report.only_in_port = sorted(set(port_shapes) - set(native_shapes))
    report.only_in_native = sorted(set(native_shapes) - set(port_shapes))
    report.shape_mismatch = {
        n: {"port": port_shapes[n], "native": native_shapes[n]}
        for n in sorted(set(port_shapes) & set(native_shapes))
        if port_shapes[n] != native_shapes[n]
    }
    report.params_equal = not (
        report.only_in_port or report.only_in_native or report.shape_mismatch
    )


def _compare_loaded(report: StructureReport, port, native) -> None:
    """Each tensor both loaded (same name and shape), element for element."""
    import torch

    port_p = dict(port.named_parameters())
    native_p = dict(native.named_parameters())
    for name in sorted(set(port_p) & set(native_p)):
        a, b = port_p[name].data, native_p[name].data
        if a.shape != b.shape:
            continue  # already reported as a shape mismatch
        report.tensors_compared += 1
        if not torch.equal(a, b):
            diff = (a.float() - b.float()).abs()
            # NaN on either side (unwritten) shows as inf: never equal.
            diff = torch.nan_to_num(diff, nan=float("inf"))
            report.tensors_differ[name] = float(diff.max())
    report.tensors_equal = not report.tensors_differ


# --------------------------------------------------------------------------------------------
# Ports on disk and the small checkpoints they are checked with.


def find_port_class(port_dir: Path, *, prepare_engine: bool = True):
    """Import a port's class: PORT.json names the module; the class is the one the package's
    ``register()`` registers (``"module:Class"`` in its ``__init__.py``), else the module
    attribute named by PORT.json's ``architecture`` or ``hf_architecture``.

    The target engine is set up first (``prepare_engine``): Aphrodite must see its device
    setting and vLLM's CPU kernels before the port's first import of it."""
    from porter.layout import PortInfo

    port_dir = Path(port_dir).resolve()
    if not (port_dir / "PORT.json").is_file():
        raise StructureInputError(f"{port_dir}: no PORT.json (not a port directory)")
    info = PortInfo.load(port_dir)
    if prepare_engine:
        engine_api(info.target)
    if str(port_dir) not in sys.path:
        sys.path.insert(0, str(port_dir))
    names = []
    init = port_dir / info.package / "__init__.py"
    if init.is_file():
        for mod, name in re.findall(r"""["']([\w.]+):(\w+)["']""", init.read_text()):
            if mod == info.module:
                names.append(name)
    names += [info.architecture, info.hf_architecture]
    try:
        module = importlib.import_module(info.module)
    except Exception as e:
        raise StructureInputError(f"{port_dir}: importing {info.module} failed: {e}") from e
    for name in names:
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return info, cls
    raise StructureInputError(f"{port_dir}: {info.module} has none of the classes {names}")


def structure_model(model_type: str, hf_architecture: str | None = None, overrides: dict | None = None):
    """The tiny HF model of ``model_type`` (and its spec) that ``porter verify`` builds
    (rules/tiny_configs.yaml), with the model's ``structure`` keys (what the engine's native classes
    assert off) and ``overrides`` on top."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from porter.verify.tiny import build_model, causal_config_type, load_rules, tiny_spec

    hf_architecture = hf_architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    spec = tiny_spec(model_type, config_model_type=causal_config_type(model_type, hf_architecture))
    spec.config_kwargs.update(load_rules()["models"][model_type].get("structure") or {})
    spec.config_kwargs.update(overrides or {})
    return spec, build_model(spec, hf_architecture)


def make_checkpoint(
    model_type: str,
    out_dir: Path,
    *,
    hf_architecture: str | None = None,
    architecture: str | None = None,
    overrides: dict | None = None,
) -> Path:
    """A tiny HF safetensors checkpoint of ``structure_model``; ``architecture`` (default: the HF
    one) is written into config.json."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from porter.verify.tiny import save_checkpoint

    hf_architecture = hf_architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    _spec, model = structure_model(model_type, hf_architecture, overrides)
    return save_checkpoint(model, out_dir, architecture or hf_architecture)


def check_port(port_dir: Path, checkpoint_dir: Path | None = None) -> StructureReport:
    """Structural report for one port directory (a tiny checkpoint is made when none is given).

    For Aphrodite the plugin and import checks run meanwhile in a fresh process
    (``porter.verify.aphrodite``) and join the report."""
    from porter.layout import PortInfo

    port_dir = Path(port_dir)
    fresh = None
    if (port_dir / "PORT.json").is_file() and PortInfo.load(port_dir).target == "aphrodite":
        from porter.verify import aphrodite

        fresh = aphrodite.start(PortInfo.load(port_dir))
    try:
        info, cls = find_port_class(port_dir)
        if checkpoint_dir is not None:
            # a quantized checkpoint's tensors (qweight, scales, ...) are not the HF model's: they
            # are checked by loading them, into the port and into the native class
            report = compare_structure(info.target, Path(checkpoint_dir), cls, info.hf_architecture,
                                       check_checkpoint=not is_quantized(checkpoint_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="porter-structure-") as tmp:
                ckpt = make_checkpoint(
                    info.model_type, Path(tmp) / "ckpt", hf_architecture=info.hf_architecture
                )
                report = compare_structure(info.target, ckpt, cls, info.hf_architecture)
            report.checkpoint = f"tiny {info.model_type} checkpoint made for this run"
    except BaseException:
        if fresh is not None:
            fresh.close()
        raise
    if fresh is not None:
        checked = fresh.result(expected_class=report.port_class)
        report.plugin, report.port_import = checked.plugin, checked.port_import
        report.ok = not report.failures()
    return report


# --------------------------------------------------------------------------------------------
# python -m porter.verify.structure PORT_DIR [PORT_DIR ...] [--checkpoint DIR] [--json]


def _format(report: StructureReport) -> str:
    status = "ok" if report.ok else "FAIL"
    head = (
        f"[{status}] {report.target} {report.port_class} vs {report.native_class or '-'} "
        f"({report.port_params} parameters, {report.tensors_compared} tensors compared, "
        f"{report.seconds:.1f}s)"
    )
    lines = [head]
    if report.plugin is not None:
        p = report.plugin
        lines.append(
            f"  plugin: {p.entry_point} ({p.group}) "
            + ("loaded by Aphrodite's loader" if p.found else "NOT loaded by Aphrodite's loader")
            + f"; ModelRegistry[{p.architecture}] -> {p.resolved_class or '-'}"
        )
    if report.port_import is not None:
        i = report.port_import
        lines.append(f"  import: {i.module} " + ("ok" if i.ok else "FAILED"))
    lines += [f"  - {f}" for f in report.failures()]
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m porter.verify.structure", description=__doc__)
    ap.add_argument("port_dirs", nargs="+", type=Path, help="ROOT/<target>/<model_type>")
    ap.add_argument("--checkpoint", type=Path, help="HF checkpoint (default: a tiny one)")
    ap.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    args = ap.parse_args(argv)
    if args.checkpoint and len(args.port_dirs) > 1:
        print("--checkpoint takes one port directory", file=sys.stderr)
        return 2
    from porter.layout import PortInfo

    targets = set()
    for d in args.port_dirs:
        if not (d / "PORT.json").is_file():
            print(f"porter verify (structure): {d}: no PORT.json", file=sys.stderr)
            return 2
        info = PortInfo.load(d)
        targets.add(info.target)
        from porter.source import installed_transformers_version

        if info.config_class and not args.checkpoint:
            # the structural check builds the HF model in this process, with this transformers
            print(f"porter verify (structure): {d}: the port ships the config of model type "
                  f"{info.config_model_type} (transformers {info.transformers_version}), which the "
                  f"installed {installed_transformers_version()} lacks: its tiny HF model cannot be "
                  "built here (day zero); verify it in vLLM "
                  "(porter verify, HF side in that release's venv)", file=sys.stderr)
            return 2
    if len(targets) > 1:
        print(f"one target per process, got {sorted(targets)}", file=sys.stderr)
        return 2

    # Engines log to stdout: keep it for the result only.
    out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    reports = []
    try:
        for port_dir in args.port_dirs:
            reports.append(check_port(port_dir, args.checkpoint))
    except StructureInputError as e:
        print(f"porter verify (structure): {e}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
    if args.json:
        payload = reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports]
        out.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    else:
        out.write("\n".join(_format(r) for r in reports) + "\n")
    out.flush()
    os.dup2(out.fileno(), 1)  # stdout is stdout again for what the caller prints next
    if any(r.checkpoint_faults for r in reports):
        return 2  # the checkpoint is bad input, not a fault of the port
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
