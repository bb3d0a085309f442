"""Which text decoder-only causal LMs a transformers tree has, read statically (``ast`` and text;
nothing under ``transformers`` is imported): the entries of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``,
each kept or excluded with its reason and the files that show it."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from porter.analysis.auto_mappings import module_name, read_mappings
from porter.coverage.common import first_line

# auto mappings that make a model type something other than a text decoder
ENC_DEC_MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")
ENCODER_MAPPINGS = ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",)
MULTIMODAL_MAPPINGS = (
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES",
    "MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES",
)
CAUSAL_CLASS = re.compile(r"(ForCausalLM|LMHeadModel)$")
PROCESSOR_FILE = re.compile(r"^(image_processing|video_processing|feature_extraction|processing)_\w+\.py$")
TOWER_CLASS = re.compile(r"^class (\w*(?:Vision|Audio|Speech|Video|Visual)\w*)\(", re.M)
TOWER_ATTR = re.compile(r"self\.((?:vision|audio|speech|video|image)_(?:tower|encoder|model))\s*=")
ENC_DEC_DEFAULT = re.compile(r"is_encoder_decoder\s*(?::\s*[\w\[\]| ]+)?=\s*True")
REL_AUTO = "models/auto/modeling_auto.py"


@dataclass
class Candidate:
    model_type: str
    hf_class: str
    module: str  # models/<module>/
    source: str | None = None  # models/<module>/modeling_<x>.py defining hf_class (relative)
    excluded: str | None = None  # reason
    evidence: list[str] = field(default_factory=list)  # files / lines that show the reason
    kind: str | None = None  # encoder-decoder | encoder-only | multimodal | not-causal-lm | alias
    # day zero only: why an entry the main sweep excludes is a row of a newer release's section
    note: str | None = None
    config_only: bool = False  # converted by model type (its own config, another family's class)


class _Tree:
    """The auto tables and modeling files of one transformers tree, each file read once."""

    def __init__(self, tf_root: Path):
        from porter.source import special_module_names

        self.root = tf_root
        self.models = tf_root / "models"
        self.auto = read_mappings(self.models / "auto" / "modeling_auto.py")
        self.special = special_module_names(tf_root)
        self.causal = self.auto["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"]
        self._defining: dict[tuple[str, str], dict[Path, str]] = {}
        # which model type "owns" a class: the first whose own module defines it (gpt2, not gpt-sw3)
        self.owner: dict[str, str] = {}
        for mt, cls in self.causal.items():
            if self.defining(module_name(mt, self.special), cls):
                self.owner.setdefault(cls, mt)

    def in_mappings(self, names: Iterable[str], *types: str) -> tuple[str, str, str] | None:
        for name in names:
            for t in types:
                if t in self.auto.get(name, {}):
                    return name, t, self.auto[name][t]
        return None

    def defining(self, mod: str, cls: str) -> dict[Path, str]:
        """The modeling_*.py files of models/MOD/ that define class CLS, with their text (sorted)."""
        if (mod, cls) not in self._defining:
            mdir = self.models / mod
            modeling = sorted(mdir.glob("modeling_*.py")) if mdir.is_dir() else []
            pat = re.compile(rf"^class {re.escape(cls)}\(", re.M)
            texts = {p: p.read_text(encoding="utf-8") for p in modeling}
            self._defining[mod, cls] = {p: text for p, text in texts.items() if pat.search(text)}
        return self._defining[mod, cls]

    def module_files(self, mod: str, pattern: str) -> list[Path]:
        mdir = self.models / mod
        return sorted(mdir.glob(pattern)) if mdir.is_dir() else []


def discover(tf_root: Path, *, day_zero: bool = False) -> list[Candidate]:
    """The causal-LM auto mapping, each entry classified (excluded with a reason, or kept).

    The text-only causal LM of a multimodal family (its own ``*ForCausalLM`` class, which builds
    no tower itself and is not the multimodal model: gemma3_text) is kept with a ``note`` saying
    why. ``day_zero=True`` (a release newer than the engine's transformers) also keeps a
    config-only model type (its own configuration file, another family's causal-LM class: the
    engine's transformers cannot read its config, so that family's port does not serve it),
    which ``porter convert <model_type> --transformers X`` ports."""
    tree = _Tree(tf_root)
    return [_classify(tree, mt, cls, day_zero) for mt, cls in tree.causal.items()]


def _classify(tree: _Tree, mt: str, cls: str, day_zero: bool) -> Candidate:
    """One entry: the checks in order, the first that settles it (excludes it, or keeps it as a
    config-only model type) ends the list."""
    c = Candidate(mt, cls, module_name(mt, tree.special))
    defining = tree.defining(c.module, cls)
    if defining:
        c.source = str(next(iter(defining)).relative_to(tree.root))
    checks = (_encoder_decoder, _encoder_only, _multimodal, _not_causal_lm, _config_only, _alias)
    for check in checks:
        if check(tree, c, day_zero):
            break
    return c


def _encoder_decoder(tree: _Tree, c: Candidate, day_zero: bool) -> bool:
    hit = tree.in_mappings(ENC_DEC_MAPPINGS, c.model_type)
    if hit:
        c.kind, c.excluded = "encoder-decoder", (
            f"encoder-decoder: {c.hf_class} is the decoder of {hit[2]} ({hit[0]} in {REL_AUTO})")
        c.evidence.append(REL_AUTO)
        return True
    enc_dec_cfg = []
    for cfg in tree.module_files(c.module, "configuration_*.py"):
        line = first_line(cfg.read_text(encoding="utf-8"), ENC_DEC_DEFAULT)
        if line:
            enc_dec_cfg.append(f"{cfg.relative_to(tree.root)}:{line}")
    if enc_dec_cfg:
        c.kind, c.excluded = "encoder-decoder", f"encoder-decoder: {enc_dec_cfg[0]} sets is_encoder_decoder=True"
        c.evidence += enc_dec_cfg
        return True
    return False


def _encoder_only(tree: _Tree, c: Candidate, day_zero: bool) -> bool:
    hit = tree.in_mappings(ENCODER_MAPPINGS, c.model_type)
    if hit:
        c.kind, c.excluded = "encoder-only", (
            f"encoder-only: a masked-LM model ({hit[2]} in {hit[0]}); {c.hf_class} is its encoder run as a decoder")
        c.evidence.append(REL_AUTO)
        return True
    return False


def _multimodal(tree: _Tree, c: Candidate, day_zero: bool) -> bool:
    """A multimodal family is excluded, except its text-only causal LM: a row with a note."""
    mm = _multimodal_evidence(tree, c)
    if not mm:
        return False
    cls = c.hf_class
    mm_classes = {v for name in MULTIMODAL_MAPPINGS for v in tree.auto.get(name, {}).values()}
    # the text-only causal LM of a multimodal family is a text decoder: a row
    if (CAUSAL_CLASS.search(cls) and c.source and cls not in mm_classes
            and not _class_builds_tower(next(iter(tree.defining(c.module, cls).values())), cls)):
        c.note = f"text model of a multimodal family ({mm[0]}); {cls} builds no tower"
        c.evidence += mm
        return False
    c.kind, c.excluded = "multimodal", f"multimodal: {mm[0]}"
    c.evidence += mm
    return True


def _multimodal_evidence(tree: _Tree, c: Candidate) -> list[str]:
    """What makes the family multimodal: an auto mapping, processor files, tower classes or attributes."""
    mod = c.module
    # the model type's own family (gemma3_text -> gemma3) for the mapping checks
    family = list(dict.fromkeys([c.model_type, mod, mod.replace("_", "-")]))
    mm = []
    hit = tree.in_mappings(MULTIMODAL_MAPPINGS, *family)
    if hit:
        mm.append(f"{hit[1]} -> {hit[2]} in {hit[0]}")
    mdir = tree.models / mod
    procs = sorted(p.name for p in mdir.iterdir() if PROCESSOR_FILE.match(p.name)) if mdir.is_dir() else []
    if procs:
        mm.append(f"models/{mod}/ ships {', '.join(procs)}")
    for p, text in tree.defining(mod, c.hf_class).items():
        towers = TOWER_CLASS.findall(text)
        attrs = sorted(set(TOWER_ATTR.findall(text)))
        if towers:
            line = first_line(text, rf"^class {re.escape(towers[0])}\(")
            mm.append(f"{p.relative_to(tree.root)}:{line} defines {towers[0]}"
                      + (f" (+{len(towers) - 1} more tower classes)" if len(towers) > 1 else ""))
        if attrs:
            line = first_line(text, rf"self\.{attrs[0]}\s*=")
            mm.append(f"{p.relative_to(tree.root)}:{line} builds self.{attrs[0]}")
    return mm


def _not_causal_lm(tree: _Tree, c: Candidate, day_zero: bool) -> bool:
    if not CAUSAL_CLASS.search(c.hf_class):
        c.kind, c.excluded = "not-causal-lm", (
            f"its causal-LM entry {c.hf_class} is not a *ForCausalLM / *LMHeadModel class ({REL_AUTO})")
        c.evidence.append(REL_AUTO)
        return True
    return False


def _config_only(tree: _Tree, c: Candidate, day_zero: bool) -> bool:
    """Day zero: a model type with a configuration file of its own and another family's class."""
    mod, cls = c.module, c.hf_class
    if c.source is None and day_zero and tree.owner.get(cls) and (tree.models / mod / f"configuration_{mod}.py").is_file():
        other = tree.owner[cls]
        c.source = str(next(iter(tree.defining(module_name(other, tree.special), cls))).relative_to(tree.root))
        c.config_only = True
        c.note = (f"config only: models/{mod}/configuration_{mod}.py, and transformers builds "
                  f"{other}'s {cls} from it; the engine's transformers lacks that config")
        c.evidence.append(f"models/{mod}/configuration_{mod}.py")
        return True
    return False


def _alias(tree: _Tree, c: Candidate, day_zero: bool) -> bool:
    """Another model type's class: none defined in its own module, or the same class as another's."""
    mt, mod, cls = c.model_type, c.module, c.hf_class
    if c.source is None:
        other = tree.owner.get(cls)
        c.kind = "alias"
        c.excluded = (f"alias: models/{mod}/ defines no {cls}; it is {other}'s class (ported as {other})"
                      if other and other != mt else f"models/{mod}/ defines no {cls}")
        c.evidence.append(f"models/{mod}/")
        return True
    if tree.owner.get(cls, mt) != mt:
        c.note = None
        c.kind, c.excluded = "alias", f"alias: same class {cls} as model type {tree.owner[cls]} (ported as {tree.owner[cls]})"
        c.evidence.append(REL_AUTO)
        return True
    return False


def _class_builds_tower(text: str, cls: str) -> bool:
    """Whether class CLS's own body builds a vision / audio / ... tower (``self.vision_tower = ``)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return True
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return bool(TOWER_ATTR.search(ast.get_source_segment(text, node) or ""))
    return True
