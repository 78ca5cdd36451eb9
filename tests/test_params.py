"""params.yaml validation: the schema and the real file agree, and every kind of mistake
stops with a ParamsError that names the dotted key."""
import copy
from pathlib import Path

import pytest
import yaml

from triage.errors import ParamsError, PipelineError
from triage.params import SCHEMA, Spec, load_params, validate

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def _leaves(tree, prefix=""):
    """Dotted paths of every leaf of a nested dict."""
    out = set()
    for key, val in tree.items():
        if isinstance(val, dict):
            out |= _leaves(val, prefix + key + ".")
        else:
            out.add(prefix + key)
    return out


def _branches(tree, prefix=""):
    out = set()
    for key, val in tree.items():
        if isinstance(val, dict):
            out.add(prefix + key)
            out |= _branches(val, prefix + key + ".")
    return out


@pytest.fixture
def raw():
    """The real params.yaml as a plain dict (a fresh deep copy per test)."""
    return yaml.safe_load(PARAMS_FILE.read_text())


def _write(tmp_path, params) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _set(tree, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


def _del(tree, dotted):
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree[p]
    del tree[leaf]


# --------------------------------------------------------------------------- schema/file


def test_schema_and_params_yaml_have_exactly_the_same_keys(raw):
    assert _leaves(raw) == _leaves(SCHEMA)
    assert _branches(raw) == _branches(SCHEMA)


def test_every_schema_leaf_is_a_spec_and_every_file_value_passes_it(raw):
    for dotted in _leaves(SCHEMA):
        spec, value = SCHEMA, raw
        for part in dotted.split("."):
            spec, value = spec[part], value[part]
        assert isinstance(spec, Spec), dotted
        spec.check(dotted, value)  # raises on mismatch


def test_load_params_on_the_real_file(raw):
    params = load_params(PARAMS_FILE)
    assert params == raw
    assert params["train"]["model"] in ("logreg", "svm", "knn", "random_forest")


def test_round_trip_through_a_written_file_is_valid(tmp_path, raw):
    assert load_params(_write(tmp_path, raw)) == raw


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("dotted", ["trian", "train.Cc", "data.demo.n_labelled", "qc.minside"])
def test_unknown_key_is_named(tmp_path, raw, dotted):
    _set(raw, dotted, 1)
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, raw))
    assert f"'{dotted}'" in str(exc.value)
    assert "unknown" in str(exc.value)


def test_typo_replacing_a_key_reports_the_typo(tmp_path, raw):
    """`trian:` instead of `train:` must name the typo, not fall back to defaults."""
    raw["trian"] = raw.pop("train")
    with pytest.raises(ParamsError, match="'trian'"):
        load_params(_write(tmp_path, raw))


def test_params_error_is_a_pipeline_error():
    assert issubclass(ParamsError, PipelineError)


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("dotted,value", [
    ("train.cv_folds", "5"),          # string for int
    ("train.cv_folds", 5.0),          # float for int
    ("train.cv_folds", True),         # bool for int
    ("train.C", True),                # bool for number
    ("train.C", "0.1"),               # string for number
    ("evaluate.n_bootstrap", [1000]),  # list for int
    ("pseudo.balance_classes", "yes"),  # string for bool
    ("pseudo.balance_classes", 1),      # int for bool
    ("data.root", 5),                   # int for str
])
def test_wrong_type_names_the_key(tmp_path, raw, dotted, value):
    _set(raw, dotted, value)
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, raw))
    assert f"'{dotted}'" in str(exc.value)
    assert "must be" in str(exc.value)


def test_int_is_accepted_where_a_number_is_expected(tmp_path, raw):
    _set(raw, "train.C", 1)
    assert load_params(_write(tmp_path, raw))["train"]["C"] == 1


def test_section_that_is_not_a_mapping(tmp_path, raw):
    raw["qc"] = 3
    with pytest.raises(ParamsError, match="'qc' must be a mapping"):
        load_params(_write(tmp_path, raw))


def test_whole_file_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="params.yaml"):
        load_params(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {C: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- missing/null


@pytest.mark.parametrize("dotted", ["evaluate.seed", "data.demo.prevalence", "cluster"])
def test_missing_key_is_named(tmp_path, raw, dotted):
    _del(raw, dotted)
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, raw))
    assert f"missing key '{dotted}'" in str(exc.value)


def test_null_for_a_required_value(tmp_path, raw):
    _set(raw, "train.C", None)
    with pytest.raises(ParamsError, match="'train.C' must not be empty"):
        load_params(_write(tmp_path, raw))


def test_nullable_value_accepts_null_and_string(tmp_path, raw):
    _set(raw, "embed.weights_sha256", None)
    assert load_params(_write(tmp_path, raw))["embed"]["weights_sha256"] is None
    _set(raw, "embed.weights_sha256", "ab" * 32)
    assert load_params(_write(tmp_path, raw))["embed"]["weights_sha256"] == "ab" * 32


# --------------------------------------------------------------------------- choices/ranges


@pytest.mark.parametrize("dotted,value", [
    ("train.model", "xgboost"),
    ("qc.leakage_policy", "ignore"),
    ("pseudo.strategy", "Cluster_Vote"),  # case matters
    ("data.source", "s3"),
])
def test_choice_not_allowed(tmp_path, raw, dotted, value):
    _set(raw, dotted, value)
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, raw))
    msg = str(exc.value)
    assert f"'{dotted}'" in msg and "one of" in msg and repr(value) in msg


@pytest.mark.parametrize("dotted,value,bound", [
    ("evaluate.target_sensitivity", 1.5, "<="),
    ("evaluate.target_sensitivity", 0.2, ">="),
    ("data.test_fraction", 0.0, ">="),
    ("train.cv_folds", 1, ">="),
    ("train.cv_folds", 21, "<="),
    ("qc.workers", -1, ">="),
    ("pseudo.min_purity", 1.01, "<="),
])
def test_out_of_range(tmp_path, raw, dotted, value, bound):
    _set(raw, dotted, value)
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, raw))
    msg = str(exc.value)
    assert f"'{dotted}'" in msg and bound in msg


def test_nan_is_rejected(tmp_path, raw):
    path = _write(tmp_path, raw)
    # `.nan` is valid YAML; NaN would silently disable every comparison against it
    path.write_text(path.read_text().replace("min_std: 2.0", "min_std: .nan"))
    assert ".nan" in path.read_text()
    with pytest.raises(ParamsError, match="'qc.min_std'"):
        load_params(path)


@pytest.mark.parametrize("dotted,value", [
    ("evaluate.target_sensitivity", 1.0),   # bounds are inclusive
    ("evaluate.target_sensitivity", 0.5),
    ("train.cv_folds", 2),
    ("embed.num_workers", -1),
])
def test_boundary_values_are_accepted(tmp_path, raw, dotted, value):
    _set(raw, dotted, value)
    load_params(_write(tmp_path, raw))


def test_validate_does_not_modify_its_input(raw):
    before = copy.deepcopy(raw)
    validate(raw)
    assert raw == before


# --------------------------------------------------------------------------- issue #14


def test_k_min_above_k_max_is_a_params_error_naming_both_keys(tmp_path, raw):
    _set(raw, "cluster.k", "auto")
    _set(raw, "cluster.k_min", 8)
    _set(raw, "cluster.k_max", 4)
    with pytest.raises(ParamsError, match=r"cluster\.k_min.*cluster\.k_max"):
        load_params(_write(tmp_path, raw))
    _set(raw, "cluster.k_max", 8)  # equal is a one-k sweep: fine
    assert load_params(_write(tmp_path, raw))["cluster"]["k_max"] == 8


def test_exponent_without_a_dot_says_how_to_write_it(tmp_path, raw):
    path = _write(tmp_path, raw)
    path.write_text(path.read_text().replace("  C: 0.1\n", "  C: 1e-3\n"))
    assert yaml.safe_load(path.read_text())["train"]["C"] == "1e-3"  # YAML 1.1: a string
    with pytest.raises(ParamsError, match=r"'train\.C'.*write 1\.0e-3"):
        load_params(path)
    path.write_text(path.read_text().replace("  C: 1e-3\n", "  C: 1.0e-3\n"))
    assert load_params(path)["train"]["C"] == 0.001


def _string_keys(tree=SCHEMA, prefix=""):
    """Dotted keys whose rule accepts a string but not a boolean."""
    for key, val in tree.items():
        if isinstance(val, dict):
            yield from _string_keys(val, prefix + key + ".")
        elif str in val.types and bool not in val.types:
            yield prefix + key


@pytest.mark.parametrize("dotted", sorted(_string_keys()))
@pytest.mark.parametrize("word", ["yes", "No", "on", "OFF", "true"])
def test_an_unquoted_yaml_boolean_for_a_string_says_to_quote_it(tmp_path, raw, dotted, word):
    # YAML 1.1 reads yes/no/on/off/true/false as booleans: `positive_class: yes` is True
    path = _write(tmp_path, raw)
    leaf = dotted.split(".")[-1]
    lines = path.read_text().splitlines()
    section, in_section = dotted.split(".")[0], False
    for i, line in enumerate(lines):  # replace the key's own line, in its own section
        if not line.startswith(" "):
            in_section = line == f"{section}:"
        elif in_section and line.strip().startswith(f"{leaf}:") and \
                len(line) - len(line.lstrip()) == 2 * (dotted.count(".")):
            lines[i] = line[: line.index(":") + 1] + f" {word}"
            break
    else:
        pytest.fail(f"{dotted} not found in params.yaml")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert f"'{dotted}' must be " in msg and "got the boolean" in msg
    assert "quote the value" in msg and word.lower() in msg


def test_a_number_for_a_string_says_to_quote_it(tmp_path, raw):
    _set(raw, "data.positive_class", 1)
    with pytest.raises(ParamsError, match=r"got the number 1; quote the value .*\"1\""):
        load_params(_write(tmp_path, raw))
