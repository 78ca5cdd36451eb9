"""embed.engine: ray runs prepare's read + hash and qc's full decode as Ray tasks: the same
manifest, clean manifest and quarantine, byte for byte; the task map is ordered, bounded,
retried when a worker dies, and reads relative paths where the driver does."""
import os
import time
from functools import partial
from pathlib import Path

import imagefactory as F
import pytest
from helpers import QC, e2e_env, make_repo, output_hashes, run, set_params

from triage.errors import PipelineError
from triage.io import write_csv, write_parquet
from triage.prepare import MANIFEST_SCHEMA, build_manifest
from triage.qc import run_qc

pytest.importorskip("ray")


def ray_map(**kw):
    from triage.ray_tasks import map_ordered

    return partial(map_ordered, **kw)


# --------------------------------------------------------------------------- the layout
@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """~400 small images in the folder layout, a bad one of each kind among them."""
    root = tmp_path_factory.mktemp("layout") / "raw"
    lay = F.make_layout(root, n_labeled={"cancer": 120, "normal": 120}, n_unlabeled=110,
                        n_test={"cancer": 25, "normal": 25})
    u, n = root / "unlabeled", root / "labeled" / "normal"
    # seeds >= 10**6: make_layout's are below, and the same seed would be a near-duplicate
    F.write_zero_byte(u / "zero.png")
    F.write_truncated_jpeg(u / "truncated.jpg", seed=10**6 + 1)
    F.write_truncated_jpeg(n / "truncated_labeled.jpg", seed=10**6 + 2)
    F.write_text_as_image(u / "notes.png")
    F.write_blank(u / "blank.png")
    F.write_blank(n / "blank_labeled.png", value=40)
    F.write_tiny(u / "tiny.png", seed=10**6 + 3)
    F.write_rgba_png(u / "rgba.png", seed=10**6 + 4)  # kept, with a note
    F.write_png_named_jpg(u / "png_named.jpg", seed=10**6 + 5)  # kept, with a note
    F.write_non_utf8_name(u, seed=10**6 + 6)
    F.copy_file(lay["unlabeled"][0], u / "copy_of_u0.png")  # exact duplicate
    F.copy_file(lay["labeled"]["cancer"][3], root / "test" / "cancer" / "leak.png")  # leakage
    return root


@pytest.fixture(scope="module")
def local(layout):
    manifest, info = build_manifest(layout, "cancer", 0.25, 0)
    return manifest, info, run_qc(manifest, **{**QC, "workers": 2}, test_source=info["test_source"])


def _files(tmp: Path, manifest, info, report) -> dict:
    """The stages' own writers: the bytes the pipeline would commit."""
    tmp.mkdir(parents=True, exist_ok=True)
    write_parquet(manifest, tmp / "manifest.parquet", schema=MANIFEST_SCHEMA,
                  metadata={"test_source": info["test_source"]})
    write_parquet(report.clean, tmp / "manifest_clean.parquet")
    write_csv(report.quarantine, tmp / "quarantine.csv")
    return {name: (tmp / name).read_bytes()
            for name in ("manifest.parquet", "manifest_clean.parquet", "quarantine.csv")}


@pytest.mark.parametrize("kw", [{}, {"batch_size": 16, "in_flight": 3}],
                         ids=["defaults", "small-batches"])
def test_ray_prepare_and_qc_write_the_local_engines_bytes(ray_cluster, layout, local, kw,
                                                          tmp_path):
    manifest, info, report = local
    r_manifest, r_info = build_manifest(layout, "cancer", 0.25, 0, map_fn=ray_map(**kw))
    r_report = run_qc(r_manifest, **QC, test_source=r_info["test_source"],
                      map_fn=ray_map(**kw))
    assert r_info == info
    assert r_report.stats == report.stats
    assert r_report.groups == report.groups
    assert _files(tmp_path / "ray", r_manifest, r_info, r_report) == \
        _files(tmp_path / "local", manifest, info, report)
    # the bad files are there, each with its own reason: a decode that raised is data
    reasons = set(r_report.quarantine["reason"])
    assert {"zero_byte", "decode_error", "not_an_image", "blank", "too_small",
            "non_utf8_filename", "duplicate", "leakage"} <= reasons, reasons
    q = r_report.quarantine.set_index("path")
    assert q.loc[(layout / "unlabeled" / "truncated.jpg").as_posix(),
                 "detail"].startswith("decode_error: OSError")
    assert len(r_manifest) == len(r_report.clean) + len(r_report.quarantine) > 400


def test_ray_prepare_leaves_dicom_to_the_deid_index_as_the_local_engine(ray_cluster, tmp_path):
    """DICOM files of the layout are skipped by the per-file task (scan_file: None) and their
    de-identified PNGs are described by it: the same rows as the local engine's."""
    import dicomfactory as D

    from triage.deid import KEY_ENV
    from triage.ingest import deidentify_layout

    planted = D.Planted()
    root = F.make_layout(tmp_path / "raw", n_labeled={"cancer": 20, "normal": 20})["root"]
    D.wrap(D.image(1, True), root / "labeled/cancer/DOE^JOHN00.dcm", 0, 0, planted)
    D.wrap(D.image(2, False), root / "unlabeled/DOE^JOHN01/IMG", 1, 0, planted)
    D.wrap(D.image(3, False), root / "labeled/normal/b.dcm", 2, 0, planted, burned_in="YES")
    deid = {"window": None, "multi_frame": "middle", "burned_in": "quarantine",
            "mask_border_px": 0, "dates": "shift", "reid_table": None}
    deidentify_layout(root, deid, tmp_path / "deid", environ={KEY_ENV: "k" * 40})
    kw = {"deid_index": tmp_path / "deid/index.parquet"}
    local, info = build_manifest(root, "cancer", 0.25, 0, **kw)
    remote, r_info = build_manifest(root, "cancer", 0.25, 0, **kw,
                                    map_fn=ray_map(batch_size=8, in_flight=2))
    assert info["n_dicom"] == r_info["n_dicom"] == 3 and r_info == info
    assert remote.equals(local)
    assert remote["read_error"].str.startswith("burned_in").sum() == 1


def test_the_local_engine_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, stages.prepare, stages.qc, triage.ray_tasks; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                   check=True)


# --------------------------------------------------------------------------- the task map
def test_map_ordered_keeps_input_order_whichever_task_ends_first(ray_cluster):
    from triage.ray_tasks import map_ordered

    def slow_first(x):  # the first batch ends last
        if x < 5:
            time.sleep(0.5)
        return -x

    items = list(range(203))
    assert list(map_ordered(slow_first, items, batch_size=5, in_flight=4)) == [-x for x in items]
    assert list(map_ordered(abs, [], batch_size=5)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(map_ordered(abs, items, batch_size=0))


def test_map_ordered_keeps_a_bounded_number_of_tasks_in_flight(ray_cluster, tmp_path):
    """The first result back, then a pause: only the tasks in flight have run, not all."""
    from triage.ray_tasks import map_ordered

    marks = str(tmp_path)

    def mark(x):
        Path(marks, f"{x}.done").touch()
        return x

    results = map_ordered(mark, range(100), batch_size=5, in_flight=2)
    assert next(results) == 0
    # batch 0 consumed: batches 1, 2 (in flight) and 3 (submitted on taking batch 0)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 15 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # nothing else is running to mark more
    assert len(list(tmp_path.iterdir())) == 15
    assert list(results) == list(range(1, 100))  # and the rest when asked for
    assert len(list(tmp_path.iterdir())) == 100


def test_a_task_whose_worker_dies_is_retried(ray_cluster, tmp_path):
    from triage.ray_tasks import map_ordered

    flag = str(tmp_path / "died-once")

    def die_once(x):
        if x == 7 and not os.path.exists(flag):
            Path(flag).touch()
            os._exit(1)  # the worker process dies, as in an OOM kill
        return x * 2

    assert list(map_ordered(die_once, range(40), batch_size=10, max_retries=2)) == \
        [x * 2 for x in range(40)]
    assert os.path.exists(flag)


def test_a_worker_dying_past_its_retries_is_a_clear_error_without_the_items(ray_cluster):
    from triage.ray_tasks import map_ordered

    def die(x):
        os._exit(1)

    items = [f"patient-{i}.png" for i in range(4)]
    with pytest.raises(PipelineError, match=r"items 0-1 \(of 4\) failed after 0 retries") as exc:
        list(map_ordered(die, items, batch_size=2, max_retries=0))
    assert "patient" not in str(exc.value)  # a path is health data: never in a message


def test_an_exception_in_the_function_is_raised_as_the_local_engine_raises_it(ray_cluster):
    from triage.ray_tasks import map_ordered

    def bad(x):
        if x == 3:
            raise KeyError("a bug")
        return x

    with pytest.raises(KeyError, match="a bug"):
        list(map_ordered(bad, range(10), batch_size=4))


def test_relative_paths_are_read_in_the_drivers_directory(ray_cluster, tmp_path, monkeypatch):
    """The workers started in another directory (the fixture's): a relative path means what
    it means on the driver, as for a joined cluster's workers (RAY_ADDRESS)."""
    from triage.ray_tasks import map_ordered

    for i in range(6):
        (tmp_path / f"f{i}.bin").write_bytes(b"x" * i)
    monkeypatch.chdir(tmp_path)
    names = [f"f{i}.bin" for i in range(6)]
    assert list(map_ordered(os.path.getsize, names, batch_size=4)) == list(range(6))


def test_the_stages_name_the_ray_dependency_and_switch(repo_root):
    import yaml

    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name in ("prepare", "qc"):
        assert "embed.engine" in stages[name]["params"]
        assert "triage/ray_tasks.py" in stages[name]["deps"]
        assert "triage/embed.py" not in stages[name]["deps"]  # no re-run on embedder changes


# --------------------------------------------------------------------------- dvc repro
PREPARE_QC_OUTPUTS = ("data/prepared/", "data/qc/", "reports/qc.html", "metrics/prepare/",
                      "metrics/qc/")


def test_dvc_repro_with_the_ray_engine_gives_the_local_outputs(ray_cluster, tmp_path):
    """`dvc repro qc` (TINY demo) local, then with embed.engine: ray joining the test's Ray
    through RAY_ADDRESS: prepare and qc re-run (their params changed) and write the same
    files. The joined workers start in the pytest process's directory, not the repo's, so
    the manifest's relative paths are only right if the tasks run where the driver does."""
    env = e2e_env(tmp_path)
    repo = make_repo(tmp_path, env)
    run(["dvc", "repro", "qc"], repo, env)
    local = {k: v for k, v in output_hashes(repo).items() if k.startswith(PREPARE_QC_OUTPUTS)}
    assert {"data/prepared/manifest.parquet", "data/qc/quarantine.csv"} <= set(local)

    set_params(repo, {"embed.engine": "ray"})
    # qc's decode cache (persist: true) would answer every image: without it Ray decodes all
    (repo / "data/qc/image_cache.parquet").unlink(missing_ok=True)
    address = ray_cluster.get_runtime_context().gcs_address
    res = run(["dvc", "repro", "qc"], repo, {**env, "RAY_ADDRESS": address})
    assert "Running stage 'prepare'" in res.stdout and "Running stage 'qc'" in res.stdout
    log = res.stdout + res.stderr
    assert log.count("Connected to Ray cluster") == 2, log  # prepare's and qc's driver
    assert "Started a local Ray instance" not in log
    remote = {k: v for k, v in output_hashes(repo).items() if k.startswith(PREPARE_QC_OUTPUTS)}
    assert remote == local
