"""Load and validate ``params.yaml``.

Every stage validates the whole file at start-up so a typo (``trian.C``) or a wrong
type fails in seconds with the dotted key named, instead of silently falling back
to a default deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ParamsError


@dataclass(frozen=True)
class Spec:
    """One leaf of the schema."""

    types: tuple
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None:
            if self.nullable:
                return
            raise ParamsError(f"params: '{key}' must not be empty")
        # a string read as a boolean or number by YAML: say to quote it
        if str in self.types and bool not in self.types and (
                isinstance(value, bool) or
                (isinstance(value, (int, float)) and not isinstance(value, self.types))):
            kind = "a string" if self.types == (str,) else self._type_names()
            raise ParamsError(f"params: '{key}' must be {kind}, got {_yaml_scalar(value)}; "
                              f"quote the value in params.yaml (e.g. {key.split('.')[-1]}: "
                              f"\"{_yaml_word(value)}\")")
        # bool is an int subclass: reject True where a number is expected.
        if isinstance(value, bool) and bool not in self.types:
            raise ParamsError(f"params: '{key}' must be {self._type_names()}, got bool {value!r}")
        if isinstance(value, str) and float in self.types and str not in self.types \
                and _yaml11_float(value):
            raise ParamsError(
                f"params: '{key}' must be a number, got the string {value!r}: YAML reads an "
                f"exponent without a dot as text; write {_dotted(value)} instead")
        if not isinstance(value, self.types):
            raise ParamsError(
                f"params: '{key}' must be {self._type_names()}, got {type(value).__name__} {value!r}"
            )
        if self.choices is not None and isinstance(value, str) and value not in self.choices:
            raise ParamsError(f"params: '{key}' must be one of {list(self.choices)}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN passes every < / > comparison: reject it explicitly
                raise ParamsError(f"params: '{key}' must be a number, got {value!r}")
            if self.min is not None and value < self.min:
                raise ParamsError(f"params: '{key}' must be >= {self.min}, got {value!r}")
            if self.max is not None and value > self.max:
                raise ParamsError(f"params: '{key}' must be <= {self.max}, got {value!r}")

    def _type_names(self) -> str:
        return " or ".join(t.__name__ for t in self.types)


# YAML 1.1 (PyYAML) reads these unquoted words as booleans
YAML_BOOL_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}


def _yaml_scalar(value: bool | int | float) -> str:
    if isinstance(value, bool):
        words = "/".join(YAML_BOOL_WORDS[value])
        return (f"the boolean {value} (YAML 1.1 reads an unquoted {words} as "
                f"{str(value).lower()})")
    return f"the number {value!r}"


def _yaml_word(value: bool | int | float) -> str:
    return YAML_BOOL_WORDS[value][0] if isinstance(value, bool) else repr(value)


def _yaml11_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _dotted(text: str) -> str:
    """``1e-3`` -> ``1.0e-3`` (the spelling PyYAML's YAML 1.1 resolver reads as a float)."""
    mantissa, sep, exp = text.lower().partition("e")
    if sep and "." not in mantissa:
        mantissa += ".0"
    return mantissa + sep + exp


INT = (int,)
NUM = (int, float)
STR = (str,)
BOOL = (bool,)


class PercentList(Spec):
    """A non-empty list of distinct shares in [min, max], each a whole percentage: the
    metric keys derive from them (0.95 → ``s95``, triage.metrics.triage_key), so 0.995 is
    rejected here rather than given an ambiguous key. Only ``evaluate.triage_targets``."""

    def check(self, key: str, value: Any) -> None:
        example = "e.g. [0.90, 0.95, 0.98]"
        if not isinstance(value, list) or not value:
            raise ParamsError(f"params: '{key}' must be a non-empty list of numbers ({example}), "
                              f"got {type(value).__name__} {value!r}")
        item = Spec(NUM, min=self.min, max=self.max)
        for i, v in enumerate(value):
            item.check(f"{key}[{i}]", v)
            if abs(100 * v - round(100 * v)) > 1e-6:
                raise ParamsError(f"params: '{key}[{i}]' must be a whole percentage ({example}: "
                                  f"its metric key is s + the percent, s95), got {v!r}")
        if len({round(100 * v) for v in value}) != len(value):
            raise ParamsError(f"params: '{key}' lists a target twice, got {value!r}")


class Window(Spec):
    """``null`` or ``[center, width]`` (numbers, width >= 1, as PS3.3's linear window needs):
    a fixed DICOM VOI window for every file. Only ``deid.window``."""

    def check(self, key: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, list) or len(value) != 2:
            raise ParamsError(f"params: '{key}' must be null or [center, width] (e.g. [40, 400]), "
                              f"got {type(value).__name__} {value!r}")
        Spec(NUM).check(f"{key}[0]", value[0])
        Spec(NUM).check(f"{key}[1]", value[1])
        if value[1] < 1:
            raise ParamsError(f"params: '{key}[1]' (the width) must be >= 1, got {value[1]!r}")

class Layers(Spec):
    """``auto`` | ``final`` | a non-empty list of distinct module names (tapped and pooled,
    triage.backbone.pooled_layers; the names are checked against the model when it is
    built). Only ``embed.layers``."""

    def check(self, key: str, value: Any) -> None:
        if isinstance(value, (str, bool)):  # a bool: an unquoted yes/no, say to quote it
            Spec(STR, choices=("auto", "final")).check(key, value)
            return
        if not isinstance(value, list) or not value:
            raise ParamsError(f"params: '{key}' must be auto, final or a non-empty list of "
                              f"module names (e.g. [layer1, layer2]), got "
                              f"{type(value).__name__} {value!r}")
        for i, name in enumerate(value):
            Spec(STR).check(f"{key}[{i}]", name)
        if len(set(value)) != len(value):
            raise ParamsError(f"params: '{key}' names a module twice, got {value!r}")


# The single source of truth for which keys exist. Adding a param = add it here and
# in params.yaml (tests check both agree).
SCHEMA: dict[str, Any] = {
    "data": {
        "source": Spec(STR, choices=("demo", "folder", "archive")),
        "root": Spec(STR),
        "positive_class": Spec(STR),
        "test_fraction": Spec(NUM, min=0.05, max=0.9),
        "seed": Spec(INT, min=0),
        "links_outside_root": Spec(STR, choices=("follow", "quarantine")),
        "demo": {
            "n_labeled": Spec(INT, min=4),
            "n_unlabeled": Spec(INT, min=0),
            "n_test": Spec(INT, min=4),
            "prevalence": Spec(NUM, min=0.0, max=1.0),
            "image_size": Spec(INT, min=32, max=1024),
            "difficulty": Spec(NUM, min=0.1, max=5.0),
            "benign_mass_rate": Spec(NUM, min=0.0, max=1.0),
        },
    },
    "deid": {  # DICOM de-identification (stage deid, docs/privacy.md); the key is never a param
        "window": Window((list,), nullable=True),
        "multi_frame": Spec(STR, choices=("middle", "first", "quarantine")),
        "burned_in": Spec(STR, choices=("quarantine", "mask", "keep")),
        "mask_border_px": Spec(INT, min=0),
        "dates": Spec(STR, choices=("shift", "remove")),
        "reid_table": Spec(STR, nullable=True),  # a path outside the repository, or null
    },
    "qc": {
        "min_side": Spec(INT, min=1),
        "max_pixels": Spec(INT, min=1),
        "min_std": Spec(NUM, min=0.0),
        "max_aspect": Spec(NUM, min=1.0),
        "leakage_policy": Spec(STR, choices=("drop_test", "keep", "fail")),
        "convert_modes": Spec(BOOL),
        "size_outlier_factor": Spec(NUM, min=0.01, max=1.0),
        "size_outlier_policy": Spec(STR, choices=("note", "quarantine")),
        "near_dup_hamming": Spec(INT, min=0, max=64),
        "near_dup_policy": Spec(STR, choices=("report", "quarantine")),
        "workers": Spec(INT, min=0),
    },
    "embed": {
        # a torchvision classification model or timm:<name>; the name is checked against
        # the libraries when the embedder is built (triage.backbone.parse_backbone)
        "backbone": Spec(STR),
        "weights": Spec(STR),  # random | imagenet | pretrained | ssl | path to a weights file
        "weights_sha256": Spec(STR, nullable=True),
        "seed": Spec(INT, min=0),
        "image_size": Spec(INT, min=32, max=1024),
        "crop": Spec(STR, choices=("none", "model")),
        "layers": Layers(STR),
        "batch_size": Spec(INT, min=1),
        "num_workers": Spec(INT, min=-1),
        "device": Spec(STR, choices=("auto", "cpu", "cuda")),
        "precision": Spec(STR, choices=("fp32", "bf16", "auto")),
        "kernels": Spec(STR, choices=("canonical", "fast")),
        # where the per-image work runs (not in the fingerprint: the same vectors either way);
        # prepare's read + hash and qc's full decode follow it too (the same manifests)
        "engine": Spec(STR, choices=("local", "ray")),
        # the store's layout at data/features/embeddings.parquet (not in the fingerprint:
        # the same rows and vectors either way; triage.store)
        "store": Spec(STR, choices=("file", "partitioned")),
    },
    "cluster": {
        "pca_components": Spec(INT, min=2),
        "method": Spec(STR, choices=("kmeans", "gmm", "hdbscan")),
        "k": Spec((int, str), choices=("auto",), min=2),
        "k_min": Spec(INT, min=2),
        "k_max": Spec(INT, min=2),
        "min_cluster_size": Spec(INT, min=2),
        "seed": Spec(INT, min=0),
        # the library of every vector search, not only k-means: label spreading's kNN graph,
        # select's k-center, the report's nearest labelled images, the OOD/drift kNN
        # (triage.neighbours); the exact searches give the same results either way
        "backend": Spec(STR, choices=("sklearn", "faiss")),
    },
    "pseudo": {
        "strategy": Spec(STR, choices=("cluster_vote", "confidence", "self_training",
                                       "label_spreading", "consensus")),
        "confidence_threshold": Spec(NUM, min=0.5, max=1.0),
        "min_purity": Spec(NUM, min=0.5, max=1.0),
        "min_support": Spec(INT, min=1),
        "balance_classes": Spec(BOOL),
        "C": Spec(NUM, min=1e-6),
        "class_prior": Spec(NUM, min=0.01, max=0.99, nullable=True),
        "max_fraction": Spec(NUM, min=0.0, max=1.0),
        "min_confidence": Spec(NUM, min=0.5, max=1.0),
        "rounds": Spec(INT, min=1, max=20),
        "pca_components": Spec(INT, min=2),
        "n_neighbors": Spec(INT, min=1),
        "spreading_alpha": Spec(NUM, min=0.0, max=0.999),
        "round_weight": Spec(NUM, min=0.0),
        "seed": Spec(INT, min=0),
    },
    "crossval": {
        "folds": Spec(INT, min=2, max=20),
        "repeats": Spec(INT, min=1, max=50),
        "seed": Spec(INT, min=0),
    },
    "train": {
        "model": Spec(STR, choices=("logreg", "svm", "knn", "random_forest")),
        "C": Spec(NUM, min=1e-6),
        "class_weight": Spec(STR, choices=("balanced", "none")),
        "calibration": Spec(STR, choices=("none", "sigmoid")),
        "pseudo_weighting": Spec(STR, choices=("confidence", "uniform")),
        "pseudo_weight_scale": Spec(NUM, min=0.0),
        "cv_folds": Spec(INT, min=2, max=20),
        "seed": Spec(INT, min=0),
    },
    "evaluate": {
        "target_sensitivity": Spec(NUM, min=0.5, max=1.0),
        "triage_targets": PercentList((list,), min=0.5, max=1.0),  # keys s90, s95, s98
        "n_bootstrap": Spec(INT, min=0),
        "ci_level": Spec(NUM, min=0.5, max=0.999),
        "calibration_bins": Spec(INT, min=2),
        "seed": Spec(INT, min=0),
    },
    "pretrain": {
        "enabled": Spec(BOOL),
        "weights": Spec(STR),  # random | imagenet | path to a .pth state dict
        "seed": Spec(INT, min=0),
        "image_size": Spec(INT, min=16, max=1024),
        "epochs": Spec(INT, min=1, max=10000),
        "batch_size": Spec(INT, min=2),
        "lr": Spec(NUM, min=1e-8, max=10.0),
        "weight_decay": Spec(NUM, min=0.0),
        "temperature": Spec(NUM, min=0.01, max=10.0),
        "projection_dim": Spec(INT, min=2),
        "max_images": Spec(INT, min=0),
        "threads": Spec(INT, min=1),
        "device": Spec(STR, choices=("auto", "cpu", "cuda")),
    },
    "finetune": {
        "enabled": Spec(BOOL),
        "weights": Spec(STR),  # random | imagenet | ssl | path to a .pth state dict
        "weights_sha256": Spec(STR, nullable=True),
        "seed": Spec(INT, min=0),
        "image_size": Spec(INT, min=16, max=1024),
        "epochs": Spec(INT, min=1, max=10000),
        "batch_size": Spec(INT, min=1),
        "lr": Spec(NUM, min=1e-8, max=10.0),
        "momentum": Spec(NUM, min=0.0, max=0.999),
        "weight_decay": Spec(NUM, min=0.0),
        "consistency": Spec(BOOL),
        "lambda_u": Spec(NUM, min=0.0),
        "mu": Spec(INT, min=1, max=64),
        "threshold": Spec(NUM, min=0.5, max=1.0),
        "distribution_alignment": Spec(BOOL),
        "class_prior": Spec(NUM, min=0.01, max=0.99, nullable=True),
        "cv_folds": Spec(INT, min=2, max=20),
        "threads": Spec(INT, min=1),
        "device": Spec(STR, choices=("auto", "cpu", "cuda")),
    },
    "select": {
        "batch_size": Spec(INT, min=1),
        "uncertainty": Spec(STR, choices=("margin", "entropy")),
        "diversity": Spec(STR, choices=("kcenter", "cluster", "none")),
        "candidates": Spec(INT, min=0),
        "pca_components": Spec(INT, min=2),
    },
    "audit": {
        "filter_by": Spec(STR, choices=("prune_by_noise_rate", "prune_by_class", "both",
                                        "confident_learning", "predicted_neq_given",
                                        "low_normalized_margin", "low_self_confidence")),
        "max_rows": Spec(INT, min=1),
    },
    "inference": {
        "model": Spec(STR),
        "review_margin": Spec(NUM, min=0.0, max=0.5),
        "ood_k": Spec(INT, min=1),  # OOD reference (train stage, kept in the bundle)
        "ood_quantile": Spec(NUM, min=0.5, max=1.0),
        "max_upload_mb": Spec(NUM, min=0.001),
        "rate_limit_per_minute": Spec(INT, min=1),
        "max_concurrent": Spec(INT, min=1),
        "audit_log": Spec(STR),  # "" = $TRIAGE_AUDIT_LOG or the default outside the repo
        "audit_probability": Spec(BOOL),
        "audit_max_bytes": Spec(INT, min=1024),
        "audit_keep": Spec(INT, min=1, max=1000),
        "retention_days": Spec(NUM, min=0.0),
        "predictions_dir": Spec(STR),
    },
    "drift": {
        "batch": Spec(STR),  # "" = the test split
        "alpha": Spec(NUM, min=1e-6, max=0.5),
        "n_permutations": Spec(INT, min=10, max=10000),
        "max_images": Spec(INT, min=20),
        "pca_components": Spec(INT, min=2),
        "match_prevalence": Spec(BOOL),
        "seed": Spec(INT, min=0),
    },
}


def _get(params: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        params = params[part]
    return params


# Rules between two keys, checked after every key passed its own rule:
# (key a, key b, holds(a, b), what must hold). Errors name both keys.
CROSS_RULES: tuple = (
    ("cluster.k_min", "cluster.k_max", lambda lo, hi: lo <= hi,
     "cluster.k_min must be <= cluster.k_max (the k: auto sweep range)"),
    ("deid.burned_in", "deid.mask_border_px", lambda rule, px: rule != "mask" or px > 0,
     "deid.burned_in: mask needs deid.mask_border_px > 0 (a 0-pixel border masks nothing)"),
)


def check_cross_keys(params: dict) -> dict:
    """Raise ParamsError for the first broken rule of ``CROSS_RULES``."""
    for a, b, holds, rule in CROSS_RULES:
        va, vb = _get(params, a), _get(params, b)
        if not holds(va, vb):
            raise ParamsError(f"params: '{a}' = {va!r} and '{b}' = {vb!r} conflict: {rule}")
    return params


def spec(dotted: str) -> Spec:
    """The rule of one dotted key (``"qc.leakage_policy"``): modules that check a value
    themselves (library calls outside a stage) look it up here instead of restating it."""
    node: Any = SCHEMA
    for part in dotted.split("."):
        node = node[part]
    if not isinstance(node, Spec):
        raise KeyError(f"{dotted} is a section, not a key")
    return node


def check(dotted: str, value: Any) -> Any:
    """Validate one value against its rule (ParamsError naming the key); returns it."""
    spec(dotted).check(dotted, value)
    return value


def validate(params: Any, schema: dict = SCHEMA, prefix: str = "") -> dict:
    """Raise ParamsError naming the first unknown, missing or mistyped dotted key."""
    if not isinstance(params, dict):
        where = prefix.rstrip(".") or "params.yaml"
        raise ParamsError(f"params: '{where}' must be a mapping, got {type(params).__name__}")
    for key in params:
        if key not in schema:
            known = ", ".join(prefix + k for k in schema)
            raise ParamsError(f"params: unknown key '{prefix}{key}' (known here: {known})")
    for key, spec in schema.items():
        dotted = prefix + key
        if key not in params:
            raise ParamsError(f"params: missing key '{dotted}'")
        if isinstance(spec, dict):
            validate(params[key], spec, dotted + ".")
        else:
            spec.check(dotted, params[key])
    if schema is SCHEMA:  # the whole file: rules between keys (CROSS_RULES)
        check_cross_keys(params)
    return params


def load_params(path: str | Path = "params.yaml") -> dict:
    """Read and validate params.yaml; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"params: {path} is not valid YAML: {exc}") from None
    return validate(params)


def main(argv: list[str] | None = None) -> None:
    """``python -m triage.params [params.yaml]``: validate before ``dvc repro``. DVC deletes
    a stage's outputs (its ``cache: false`` metrics too) before the stage runs, so a stage
    refusing a bad key leaves ``git status`` showing them deleted; checking first does not."""
    import sys

    path = (sys.argv[1:] if argv is None else argv) or ["params.yaml"]
    try:
        load_params(path[0])
    except ParamsError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{path[0]}: valid")


if __name__ == "__main__":
    main()
