"""triage.io: CSV formula neutralisation and one-line filesystem errors from run_stage."""
import csv
import errno
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from triage import io as tio
from triage.io import run_stage, write_csv


def test_write_csv_neutralises_formula_cells(tmp_path):
    df = pd.DataFrame({"path": ['=HYPERLINK("http://x","y").png', "+1.png", "-2.png", "@SUM(A1).png",
                                "\tx.png", "ok/=x.png", "normal.png"],
                       "score": [-0.5, 1.0, -2.0, 0.0, 3.0, 5.0, 6.0]})
    out = tmp_path / "x.csv"
    write_csv(df, out)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == ["'=HYPERLINK(\"http://x\",\"y\").png", "'+1.png", "'-2.png",
                                     "'@SUM(A1).png", "'\tx.png", "ok/=x.png",
                                     "normal.png"]
    # numbers stay numbers: -0.5 is not a formula
    assert [float(r["score"]) for r in rows] == [-0.5, 1.0, -2.0, 0.0, 3.0, 5.0, 6.0]
    assert [r["score"] for r in rows][:3] == ["-0.5", "1.0", "-2.0"]
    assert "\n-0.5" not in out.read_text() and ",-0.5\n" in out.read_text()
    assert df["path"].iloc[0].startswith("=")  # the caller's frame is not modified


def test_neutralise_leaves_numbers_missing_values_and_plain_text_alone():
    # a leading carriage return is escaped (two characters), which no spreadsheet evaluates
    assert tio.neutralise_formulas(pd.DataFrame({"p": ["\rx"]}))["p"].iloc[0] == "\\rx"
    df = pd.DataFrame({"a": ["plain", None, "-x"], "n": [-1, 2, 3],
                       "o": pd.Series([-1.5, "=x", None], dtype=object),
                       "s": pd.Series(["=y", "z", None], dtype="string")})
    got = tio.neutralise_formulas(df)
    assert got["a"].tolist()[0] == "plain" and pd.isna(got["a"].iloc[1]) and got["a"].iloc[2] == "'-x"
    assert got["n"].tolist() == [-1, 2, 3] and got["n"].dtype == df["n"].dtype
    assert got["o"].iloc[0] == -1.5 and got["o"].iloc[1] == "'=x" and got["o"].iloc[2] is None
    assert got["s"].iloc[0] == "'=y" and got["s"].iloc[1] == "z" and pd.isna(got["s"].iloc[2])


def _deny(exc):
    def fake_mkstemp(*a, **k):
        raise exc
    return fake_mkstemp


@pytest.mark.parametrize("exc, words", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
])
def test_run_stage_turns_a_write_error_into_one_line(tmp_path, monkeypatch, capsys, exc, words):
    out = tmp_path / "qc" / "quarantine.csv"
    monkeypatch.setattr(tempfile, "mkstemp", _deny(exc))
    with pytest.raises(SystemExit) as ex:
        run_stage(lambda: write_csv(pd.DataFrame({"a": [1]}), out))
    assert ex.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"ERROR: cannot write {out}: {words}")
    assert "(" in err and ")" in err  # what to do


def test_run_stage_output_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "some_file").write_text("x")
    out = tmp_path / "some_file" / "x.csv"
    with pytest.raises(SystemExit) as ex:
        run_stage(lambda: write_csv(pd.DataFrame({"a": [1]}), out))
    assert ex.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {out}" in err
    assert "is a file" in err or "not a folder" in err


def test_run_stage_filesystem_error_outside_atomic_writes_is_one_line(tmp_path, capsys):
    target = tmp_path / "plots" / "a.png"

    def main():
        raise PermissionError(errno.EACCES, "Permission denied", str(target))
    with pytest.raises(SystemExit) as ex:
        run_stage(main)
    assert ex.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err and "permission denied" in err


@pytest.mark.parametrize("exc", [TypeError("bug"), KeyError("bug"),
                                 OSError(errno.EINVAL, "Invalid argument"),
                                 ConnectionResetError(errno.ECONNRESET, "reset")])
def test_run_stage_does_not_hide_other_errors(exc):
    def main():
        raise exc
    with pytest.raises(type(exc)):
        run_stage(main)


def test_atomic_path_leaves_no_temp_file_after_a_failed_write(tmp_path):
    out = tmp_path / "a.csv"
    with pytest.raises(getattr(tio, "OutputError", ()) or SystemError):
        with tio.atomic_path(out) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_params_error_says_how_to_restore_the_metrics_dvc_removed(capsys):
    from triage.errors import ParamsError
    from triage.io import run_stage

    def main():
        raise ParamsError("params: unknown key 'trian.C'")

    with pytest.raises(SystemExit) as exc:
        run_stage(main)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "unknown key 'trian.C'" in err and "git checkout metrics/" in err
    assert "python -m triage.preflight" in err and "Traceback" not in err


def test_params_check_command_validates_before_dvc_removes_outputs(tmp_path):
    import subprocess
    import sys

    good = subprocess.run([sys.executable, "-m", "triage.params"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert good.returncode == 0 and "valid" in good.stdout
    bad = tmp_path / "params.yaml"
    bad.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text()
                   .replace("  k_min: 2 ", "  k_min: 20 "))
    res = subprocess.run([sys.executable, "-m", "triage.params", str(bad)], capture_output=True,
                         text=True)
    assert res.returncode == 1 and "cluster.k_min" in res.stderr and "cluster.k_max" in res.stderr
    assert "Traceback" not in res.stderr


def test_preflight_names_non_utf8_names_and_fails_only_if_dvc_would_hash_them(tmp_path):
    # DVC's state database cannot store such a name: without the .dvcignore rule `dvc repro`
    # stops while hashing data.root and names no file
    import shutil
    import subprocess
    import sys

    import imagefactory as F
    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="folder", root="raw")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / ".dvc").mkdir()  # a DVC repository whose .dvcignore lacks the rule
    F.write_png(tmp_path / "raw" / "labeled" / "cancer" / "ok.png")
    F.write_non_utf8_name(tmp_path / "raw" / "unlabeled")
    F.write_non_utf8_name(tmp_path / "raw" / "unlabeled", stem=b"caf\xe9")
    preflight = [sys.executable, "-m", "triage.preflight"]
    res = subprocess.run(preflight, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "2 name(s) under data.root are not UTF-8 and no .dvcignore rule" in res.stderr
    assert "raw/unlabeled/scan_\\xff.png" in res.stderr
    assert "raw/unlabeled/caf\\xe9.png" in res.stderr

    shutil.copy(root / ".dvcignore", tmp_path / ".dvcignore")
    res = subprocess.run(preflight, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "2 name(s) are not UTF-8. DVC skips them (.dvcignore)" in res.stdout
    assert "raw/unlabeled/scan_\\xff.png" in res.stdout

    for p in (tmp_path / "raw" / "unlabeled").iterdir():
        p.unlink()
    ok = subprocess.run(preflight, cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and "every name is UTF-8" in ok.stdout


def test_dvcignore_rule_hides_exactly_the_names_that_are_not_utf8(tmp_path):
    from dvc.fs import LocalFileSystem
    from dvc.ignore import DvcIgnoreFilter

    root = Path(__file__).resolve().parents[1]
    (tmp_path / ".dvcignore").write_bytes((root / ".dvcignore").read_bytes())
    ignore = DvcIgnoreFilter(LocalFileSystem(), str(tmp_path))
    cases = {  # name as os.walk spells it -> hidden from DVC
        "scan_\udcff.png": True, "caf\udce9/x.png": True, "\udc80": True,
        "plain.png": False, "café.png": False, "日本/画像.png": False, "emoji_\U0001f600.png": False,
        "\ud7ff\ue000\U0010ffff.png": False, "with space [1].png": False,
    }
    for name, hidden in cases.items():
        assert ignore.is_ignored_file(str(tmp_path / "raw" / name)) is hidden, name


def test_a_carriage_return_in_a_cell_cannot_split_the_row(tmp_path):
    # unquoted by the csv module (rows end in "\n"), a lone "\r" splits the row on reading
    out = tmp_path / "p.csv"
    write_csv(pd.DataFrame({"path": ["scan\rname.png", "ok.png", "\r=cmd"], "p": [0.5, -0.5, 1]}), out)
    back = pd.read_csv(out)
    assert back["path"].tolist() == ["scan\\rname.png", "ok.png", "\\r=cmd"]
    assert back["p"].tolist() == [0.5, -0.5, 1.0]
