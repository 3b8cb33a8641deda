"""One self-contained HTML page per pipeline (or run): learning curves, final evaluations, warnings,
evaluation numbers, reconstructions, codebook usage and samples, every image embedded.

    python scripts/report.py runs/demo                     # a pipeline: vqvae/, top/, bottom/ inside
    python scripts/report.py runs/vqvae runs/top --out report.html

A RUN_DIR is a training run (it holds log.jsonl or model.safetensors) or a pipeline directory whose
subfolders are runs. Evaluation numbers come from eval.json as `scripts/evaluate.py --json` writes
it ({stage: {name: value}}): a run's stage from its own eval.json or its pipeline's, the samples' in
the pipeline's section ("not evaluated" without them). Nothing is trained or run on a model: the
page reads what the runs wrote.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse
from pathlib import Path

from pipelines.cli import run, user_path
from pipelines.eval.report import write_report


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=user_path, metavar="RUN_DIR", help="runs or pipeline directories")
    p.add_argument("--out", type=user_path, help="the HTML file to write, .html or .htm (default: FIRST_RUN_DIR/report.html)")
    p.add_argument("--curves", type=user_path, help="also write the losses of every run, side by side, as this PNG")
    return p.parse_args()


def main():
    args = parse_args()
    out = write_report(args.run_dirs, args.out or Path(args.run_dirs[0]) / "report.html", args.curves)
    print(f"report: {out}")
    if args.curves:
        print(f"curves: {args.curves}")


if __name__ == "__main__":
    run(main)
