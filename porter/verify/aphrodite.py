"""Aphrodite: the checks that need a fresh process (its plugin loader, the port's import).

Aphrodite cannot run a forward pass here (see ``structure.APHRODITE_NO_FORWARD``), so besides
the in-process structural checks a port is checked the way Aphrodite itself would meet it:

- **plugin**: the port is exposed as an installed distribution (a ``<package>-0.0.0.dist-info``
  with ``entry_points.txt`` in ``aphrodite.general_plugins``, written by
  ``engine.write_plugin_dist``) on ``PYTHONPATH``; Aphrodite's own loader
  (``aphrodite.plugins.load_general_plugins``) must discover it and run its ``register()``,
  which must add PORT.json's ``architecture`` to Aphrodite's ``ModelRegistry``; the registry
  entry must resolve to the port's ``module:Class``.
- **import**: the port module imports under Aphrodite (``APHRODITE_TARGET_DEVICE=cpu`` and
  vLLM's CPU kernels first, the build vLLM picks for this CPU: porter/verify/cpu.py), and
  imports nothing from vLLM.

Both run in one fresh subprocess (``python -m porter.verify.aphrodite --child PORT_DIR``) so
that nothing registered there leaks into the caller, and nothing the caller registered
(``structure`` registers the port's class itself) can stand in for the plugin.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from porter.layout import PortInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
# Prefix of the child's result line on stdout (Aphrodite logs to stdout too).
RESULT_MARK = "PORTER_APHRODITE_CHECK "


@dataclass
class ImportCheck:
    """The port module imported in a fresh Aphrodite process."""

    module: str = ""
    ok: bool = False
    seconds: float = 0.0
    error: str | None = None
    vllm_imports: list[str] = field(default_factory=list)  # an Aphrodite port must have none

    def failures(self) -> list[str]:
        out = []
        if not self.ok:
            out.append(f"port module {self.module} does not import under Aphrodite: {self.error}")
        if self.vllm_imports:
            out.append(f"port module {self.module} imports vLLM: {self.vllm_imports}")
        return out


@dataclass
class PluginCheck:
    """Aphrodite's plugin loader meeting the port's entry point, in a fresh process."""

    group: str = ""
    entry_point: str = ""  # "name = package:register", as written to entry_points.txt
    loader: str = "aphrodite.plugins:load_general_plugins"
    discovered: list[str] = field(default_factory=list)  # every entry point in the group
    loaded_by_loader: list[str] = field(default_factory=list)  # what the loader itself loaded
    found: bool = False  # the port's entry point among what the loader loaded
    architecture: str = ""  # PORT.json architecture
    registered_before: bool = False  # must be False: nothing else may register the name
    registered: bool = False  # in ModelRegistry after the loader ran
    registry_entry: str | None = None  # how the registry holds it (lazy "module:Class")
    resolved_class: str | None = None  # module:qualname the registry entry loads
    expected_class: str | None = None  # the class the structural checks built
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.found
            and not self.registered_before
            and self.registered
            and self.resolved_class is not None
            and self.resolved_class == self.expected_class
        )

    def failures(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"plugin check failed: {self.error}")
        if not self.found:
            out.append(
                f"Aphrodite's plugin loader did not find {self.entry_point!r} in {self.group} "
                f"(it loaded {self.loaded_by_loader}; entry points: {self.discovered})"
            )
        if self.registered_before:
            out.append(f"{self.architecture} was in ModelRegistry before any plugin loaded")
        if self.found and not self.registered:
            out.append(f"the plugin ran but {self.architecture} is not in ModelRegistry")
        if self.registered and self.resolved_class != self.expected_class:
            out.append(
                f"ModelRegistry[{self.architecture}] resolves to {self.resolved_class}, "
                f"expected {self.expected_class}"
            )
        return out


@dataclass
class FreshProcessCheck:
    plugin: PluginCheck
    port_import: ImportCheck


def vllm_imports(module_file: Path) -> list[str]:
    """Modules under ``vllm`` that a source file imports (read with ast)."""
    tree = ast.parse(Path(module_file).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n == "vllm" or n.startswith("vllm.")]
    return sorted(set(found))


# --------------------------------------------------------------------------------------------
# The parent side.


class Pending:
    """A running child; ``result()`` waits for it."""

    def __init__(self, info: PortInfo, timeout_s: float = 300.0):
        from porter.verify.engine import write_plugin_dist

        self.info = info
        self.timeout_s = timeout_s
        self.t0 = time.time()
        self._tmp = tempfile.TemporaryDirectory(prefix="porter-aphrodite-plugin-")
        site = write_plugin_dist(Path(self._tmp.name) / "site", info)
        env = dict(os.environ)
        env.pop("APHRODITE_PLUGINS", None)  # the loader's allow-list: load every plugin
        env["APHRODITE_TARGET_DEVICE"] = "cpu"
        paths = [str(site), str(Path(info.path).resolve()), str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "porter.verify.aphrodite",
                "--child",
                str(Path(info.path).resolve()),
            ],
            env=env,
            cwd=self._tmp.name,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def close(self) -> None:
        """Stop the child (when the caller gives up before ``result()``)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        self._tmp.cleanup()

    def result(self, expected_class: str | None) -> FreshProcessCheck:
        """Wait for the child; ``expected_class`` is the module:qualname the registry entry
        must resolve to (the class the structural checks built)."""
        info = self.info
        plugin = PluginCheck(
            group=info.plugin_group,
            entry_point=f"{info.package} = {info.package}:register",
            architecture=info.architecture,
            expected_class=expected_class,
        )
        port_import = ImportCheck(module=info.module)
        try:
            out, err = self.proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            plugin.error = f"the fresh Aphrodite process timed out after {self.timeout_s:.0f}s"
            port_import.error = plugin.error
            return self._done(plugin, port_import)
        data = None
        for line in out.splitlines():
            if line.startswith(RESULT_MARK):
                data = json.loads(line[len(RESULT_MARK) :])
        if data is None:
            tail = (err or "").strip().splitlines()[-5:]
            plugin.error = f"the fresh Aphrodite process exited {self.proc.returncode}: " + (
                " | ".join(tail) or "no output"
            )
            port_import.error = plugin.error
            return self._done(plugin, port_import)
        for k, v in data["plugin"].items():
            setattr(plugin, k, v)
        for k, v in data["import"].items():
            setattr(port_import, k, v)
        return self._done(plugin, port_import)

    def _done(self, plugin: PluginCheck, port_import: ImportCheck) -> FreshProcessCheck:
        plugin.seconds = round(time.time() - self.t0, 3)
        self._tmp.cleanup()
        return FreshProcessCheck(plugin, port_import)


def start(info: PortInfo) -> Pending:
    """Start the fresh-process checks for ``info`` (runs alongside the caller's own work)."""
    return Pending(info)


# --------------------------------------------------------------------------------------------
# The child: python -m porter.verify.aphrodite --child PORT_DIR


def _child(port_dir: Path) -> dict:
    import importlib
    from importlib.metadata import entry_points

    info = PortInfo.load(port_dir)
    plugin: dict = {}
    imp: dict = {"module": info.module}
    result = {"plugin": plugin, "import": imp}

    # Aphrodite on the CPU: the device setting and vLLM's kernels (torch.ops._C, the build for
    # this CPU as vLLM picks it) come first.
    from porter.verify.cpu import load_kernels

    os.environ.setdefault("APHRODITE_TARGET_DEVICE", "cpu")
    load_kernels()
    import aphrodite.plugins as ap_plugins
    from aphrodite import ModelRegistry

    discovered = entry_points(group=info.plugin_group)
    plugin["discovered"] = sorted(f"{e.name} = {e.value}" for e in discovered)
    plugin["registered_before"] = info.architecture in ModelRegistry.get_supported_archs()
    if ap_plugins.plugins_loaded:
        plugin["error"] = "Aphrodite had loaded its plugins before the check called its loader"

    # Observe (not change) what Aphrodite's loader loads: load_general_plugins looks
    # load_plugins_by_group up in its module at call time.
    by_group = ap_plugins.load_plugins_by_group
    loaded: dict = {}

    def recording(group: str):
        plugins = by_group(group)
        if group == info.plugin_group:
            loaded.update(plugins)
        return plugins

    ap_plugins.load_plugins_by_group = recording
    try:
        ap_plugins.load_general_plugins()
    except Exception as e:  # noqa: BLE001 (reported)
        plugin["error"] = f"load_general_plugins raised {type(e).__name__}: {e}"
    finally:
        ap_plugins.load_plugins_by_group = by_group
    plugin["loaded_by_loader"] = sorted(loaded)
    port_fn = loaded.get(info.package)
    plugin["found"] = (
        port_fn is not None
        and getattr(port_fn, "__module__", None) == info.package
        and getattr(port_fn, "__name__", None) == "register"
    )
    plugin["registered"] = info.architecture in ModelRegistry.get_supported_archs()

    # The import check: the port module, in this process, as the engine would import it.
    t0 = time.time()
    module = None
    try:
        module = importlib.import_module(info.module)
        imp["ok"] = True
    except Exception as e:  # noqa: BLE001 (reported)
        imp["ok"] = False
        imp["error"] = f"{type(e).__name__}: {e}"
    imp["seconds"] = round(time.time() - t0, 3)
    if module is not None and getattr(module, "__file__", None):
        imp["vllm_imports"] = vllm_imports(Path(module.__file__))

    if plugin["registered"]:
        entry = ModelRegistry.models[info.architecture]
        if hasattr(entry, "module_name"):
            plugin["registry_entry"] = f"lazy {entry.module_name}:{entry.class_name}"
        else:
            plugin["registry_entry"] = f"class {type(entry).__name__}"
        try:
            cls = entry.load_model_cls()
            plugin["resolved_class"] = f"{cls.__module__}:{cls.__qualname__}"
        except Exception as e:  # noqa: BLE001 (reported)
            plugin["error"] = f"ModelRegistry could not load {info.architecture}: {e}"
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--child":
        print("usage: python -m porter.verify.aphrodite --child PORT_DIR", file=sys.stderr)
        return 2
    # Aphrodite logs to stdout: keep it for the result line only.
    out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    result = _child(Path(argv[1]))
    sys.stdout.flush()
    out.write(RESULT_MARK + json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
