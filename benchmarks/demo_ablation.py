"""The embedded demo's ablation: the stage-1 demo with each part of the method switched off in turn.

    python benchmarks/demo_ablation.py --out=/tmp/fine_ablation            # every row, ~30 min
    python benchmarks/demo_ablation.py --out=/tmp/fine_ablation --rows=full,maa_off

Each row is ``python -m fine_jax.train --config=configs/demo.py`` with the row's overrides (the
same seed, data and steps), run in ``OUT/ROW``; a row whose workdir already holds a finished run
is read, not rerun, so an interrupted ablation continues where it stopped. At the end it prints
a Markdown table of the held-out figures of each row's final evaluation (sample-100 on the
reference draw, the full protocol, the twin test, plus the twin test after ITM re-ranking when
the config asks for it) and the ITM training loss averaged over the last 10 logged steps, with
the command of every row.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# name -> (what is switched off, config overrides)
ROWS: dict[str, tuple[str, list[str]]] = {
    "full": ("full method", []),
    "maa_off": ("MAA off (mixing ratios 0)",
                ["--config.model.img_patch_ratio=0.0", "--config.model.text_patch_ratio=0.0"]),
    "hard_negatives_off": ("hard negatives off (random ITM negatives)",
                           ["--config.loss.itm_negatives=random"]),
    "focal_off": ("focal off (gamma 0)", ["--config.loss.gamma_focal=0.0"]),
    "symbol_off": ("symbol loss off", ["--config.loss.w_sym=0.0"]),
    "phrase_off": ("phrase features off (symbol feature = symbol token only)",
                   ["--config.model.symbol_ratio=1.0"]),
    "mlm_rtp_off": ("MLM and RTP off", ["--config.loss.w_mlm=0.0", "--config.loss.w_rtp=0.0"]),
}


def command(workdir: pathlib.Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "fine_jax.train", "--config=configs/demo.py",
            f"--workdir={workdir}", *overrides]


def finished(workdir: pathlib.Path) -> dict | None:
    """The final evaluation of a finished run (its last evaluated step is its last step)."""
    results = workdir / "eval_results.json"
    if not results.is_file():
        return None
    latest = json.loads(results.read_text())["latest"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    train = [r for r in rows if "loss" in r]
    if not train or latest["step"] != train[-1]["step"]:
        return None
    return {"step": latest["step"], "results": latest["results"], "last": train[-10:]}


def row_figures(run: dict) -> dict:
    r, last = run["results"], run["last"]
    out = {
        "sample-100 R@1 I2T / T2I": f"{r['sample100/i2t_r1']:.1f} / {r['sample100/t2i_r1']:.1f}",
        "full R@1 I2T / T2I": f"{r['full/i2t_r1']:.1f} / {r['full/t2i_r1']:.1f}",
        "twin I2T / T2I": f"{r['twin/i2t_acc']:.1f} / {r['twin/t2i_acc']:.1f}",
    }
    if "twin_itm/i2t_acc" in r:
        out["twin, ITM re-ranked"] = f"{r['twin_itm/i2t_acc']:.1f} / {r['twin_itm/t2i_acc']:.1f}"
    # One logged step is a single batch; the mean of the last 10 is steadier.
    out["ITM loss (last 10 logs)"] = f"{sum(x['loss_itm'] for x in last) / len(last):.3f}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the rows' workdirs")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: "
                   + ", ".join(ROWS))
    p.add_argument("--extra", default="", help="overrides added to every row, space-separated")
    args = p.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    out = pathlib.Path(args.out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    extra = args.extra.split()
    table = []
    for name in names:
        label, overrides = ROWS[name]
        workdir = out / name
        cmd = command(workdir, overrides + extra)
        run = finished(workdir)
        if run is None:
            print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO)
            if proc.returncode:
                print(f"[{name}] failed with exit code {proc.returncode}; its log is above",
                      file=sys.stderr)
                return proc.returncode
            print(f"[{name}] done in {time.time() - t0:.0f}s", flush=True)
            run = finished(workdir)
            if run is None:
                print(f"[{name}] the run ended without a final evaluation", file=sys.stderr)
                return 1
        shown = " ".join(["python -m fine_jax.train --config=configs/demo.py",
                          f"--workdir={workdir}", *overrides, *extra])
        table.append((label, row_figures(run), shown))
    heads = list(table[0][1])
    print("\n| run | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for label, figures, _ in table:
        print(f"| {label} | " + " | ".join(figures[h] for h in heads) + " |")
    print("\nCommands:")
    for label, _, shown in table:
        print(f"  {label}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
