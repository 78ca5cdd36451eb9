"""Stage `pretrain`: SimCLR self-supervised ResNet18 on labelled + unlabelled images (never
test) → data/pretrain/backbone.pt, loaded by `embed.weights: ssl` / `finetune.weights: ssl`.

Off by default (pretrain.enabled: false): the stage then only writes
data/pretrain/disabled.json, and `weights: ssl` stops with a message saying to enable it.
"""
import time
from pathlib import Path

from triage.backbone import check_weights_dependency
from triage.errors import PipelineError
from triage.io import open_live, read_parquet, reset_dir, run_stage, write_json
from triage.params import load_params
from triage.pretrain import CHECKPOINT_FILE, DISABLED_FILE, OUT_DIR

CLEAN = Path("data/qc/manifest_clean.parquet")


def main() -> None:
    p = load_params()["pretrain"]
    reset_dir(OUT_DIR)
    if not p["enabled"]:
        write_json({"stage": "pretrain", "enabled": False,
                    "enable_with": "dvc exp run -S pretrain.enabled=true"}, OUT_DIR / DISABLED_FILE)
        with open_live("pretrain") as live:
            live.log_metric("enabled", 0, plot=False)
        print("pretrain: disabled (pretrain.enabled: false); wrote the marker only")
        return

    from triage.pretrain import PretrainConfig, run_pretrain
    from triage.torch_utils import save_checkpoint

    check_weights_dependency(p["weights"], "pretrain.weights")
    if p["weights"] == "ssl":
        raise PipelineError("pretrain.weights cannot be ssl (that is its own output)")
    cfg = PretrainConfig.from_params(p)
    rows = read_parquet(CLEAN, "clean manifest")
    start = time.perf_counter()
    result = run_pretrain(rows, cfg, log=lambda r: print(
        f"pretrain: epoch {r['epoch']} loss={r['loss']:.4f}", flush=True))
    seconds = time.perf_counter() - start
    save_checkpoint(result["state_dict"], OUT_DIR / CHECKPOINT_FILE)
    with open_live("pretrain") as live:
        live.log_metric("enabled", 1, plot=False)
        live.log_metric("n_images", int(result["n_images"]), plot=False)
        live.log_metric("final_loss", result["history"][-1]["loss"], plot=False)
        live.log_plot("loss", result["history"], x="epoch", y="loss", template="linear",
                      title="SimCLR NT-Xent loss per epoch")
    print(f"pretrain: {cfg.epochs} epochs on {result['n_images']} images on {result['device']} "
          f"in {seconds:.0f}s → {OUT_DIR / CHECKPOINT_FILE}")


if __name__ == "__main__":
    run_stage(main)
