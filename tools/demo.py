"""InstructGPT in miniature: SFT -> reward model -> PPO and PPO-ptx on Shakespeare, judged by
simulated labelers (VADER trains, TextBlob is held out), with a report.

    python tools/demo.py                      # the full run (about 15 minutes on 2 CPU cores)
    python tools/demo.py --quick              # a smaller run (under 5 minutes), as CI runs it
    python tools/demo.py --output-dir runs/x  # default runs/demo (runs/demo_quick with --quick)

Running the same command again continues after the last finished stage. The report is
<output-dir>/report.md (numbers also in report.json, figures in figures/). See docs/demo.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megarlhf.demo.pipeline import Demo, DemoConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small preset (CI)")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/demo[_quick])")
    p.add_argument("--quiet", action="store_true", help="hide the tools' output (errors shown)")
    args = p.parse_args(argv)
    cfg = DemoConfig.quick() if args.quick else DemoConfig.full()
    out = args.output_dir or ("runs/demo_quick" if args.quick else "runs/demo")
    report = Demo(cfg, out, quiet=args.quiet).run()
    print(Path(out) / "report.md")
    keys = ("winrate_ppo_vs_sft_heldout", "winrate_ppo_ptx_vs_sft_heldout",
            "rm_accuracy_heldout_train_labeler", "ppl_sft", "ppl_ppo", "ppl_ppo_ptx")  # fmt: skip
    for k in keys:
        print(f"{k}: {report[k]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
