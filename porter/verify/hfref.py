"""Where the Hugging Face reference comes from: this process, or another environment.

``LocalHF`` builds the tiny model in the engine's own environment (a port of a model type the
engine's transformers knows). ``OtherEnvHF`` runs porter/verify/hf_side.py under the python of the
port's transformers release (a day-zero port) and exchanges the checkpoint, prompts, greedy
continuations, logprob rows and the MoE routing check through files. Both answer the same
questions.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from porter.verify.tiny import (
    TinySpec,
    VerifyInputError,
    _special_ids,
    build_model,
    experts_routed,
    hf_logprobs,
    hf_reference,
    make_prompts,
    prompt_vocab,
    save_checkpoint,
    tiny_spec,
    with_architecture,
)



def run_side(python: Path, module: str, args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run `python -m porter.verify.<module> ARGS` with porter itself and nothing of the engine's
    environment on the path; a failure is one VerifyInputError naming `what` and the side's own
    last line (`<module> error: ...`)."""
    repo = str(Path(__file__).resolve().parents[2])
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (env or {})
    full["PYTHONPATH"] = repo
    proc = subprocess.run([str(python), "-m", f"porter.verify.{module}", *args],
                          capture_output=True, text=True, env=full, cwd=repo)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith(f"{module} error:")),
                   lines[-1] if lines else f"exit {proc.returncode}")
        raise VerifyInputError(f"{what}: {why}")

class LocalHF:
    def __init__(self, model_type: str, hf_architecture: str, config_model_type: str = "") -> None:
        self.spec = tiny_spec(model_type, config_model_type=config_model_type)
        self.model = build_model(self.spec, hf_architecture)
        self.prompts = make_prompts(self.spec, prompt_vocab(self.model), _special_ids(self.model.config))
        self.refs = hf_reference(self.model, self.prompts, self.spec)

    def checkpoint(self, out_dir: Path, architecture: str) -> Path:
        return save_checkpoint(self.model, out_dir, architecture)

    def logprobs(self, seqs: list[list[int]]) -> list:
        return [hf_logprobs(self.model, s) for s in seqs]

    def experts_routed(self, routers: list[str]) -> dict[str, list[int]]:
        return experts_routed(self.model, self.prompts, routers)


class OtherEnvHF:
    def __init__(self, python: Path, workdir: Path, model_type: str, hf_architecture: str,
                 architecture: str, config_model_type: str = "") -> None:
        self.python, self.work = Path(python), Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.args = ["--workdir", str(self.work), "--model-type", model_type,
                     "--config-model-type", config_model_type,
                     "--hf-architecture", hf_architecture, "--architecture", architecture]
        self.architecture = architecture
        self._run("reference")
        data = json.loads((self.work / "reference.json").read_text())
        self.spec = TinySpec(**data["spec"])
        self.prompts = data["prompts"]
        self.refs = data["refs"]

    def _run(self, command: str) -> None:
        run_side(self.python, "hf_side", [command, *self.args], f"HF side ({self.python}) {command}")

    def checkpoint(self, out_dir: Path, architecture: str) -> Path:
        ckpt = self.work / "ckpt"
        return ckpt if architecture == self.architecture else with_architecture(ckpt, out_dir, architecture)

    def logprobs(self, seqs: list[list[int]]) -> list:
        import torch

        (self.work / "sequences.json").write_text(json.dumps(seqs))
        self._run("logprobs")
        return torch.load(self.work / "rows.pt")

    def experts_routed(self, routers: list[str]) -> dict[str, list[int]]:
        """The MoE routing check, run by the release's transformers on the checkpoint it wrote."""
        (self.work / "routers.json").write_text(json.dumps(routers))
        self._run("routed")
        return json.loads((self.work / "routed.json").read_text())
