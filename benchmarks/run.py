"""Run distclip's benchmark suite (``distclip bench``), and with ``--update-docs`` regenerate its page.

    python benchmarks/run.py [distclip bench options]   # the same run as: distclip bench [options]
    python benchmarks/run.py --update-docs              # the default run, then: the plot to docs/img/bench.png
                                                        # and the numbers into docs/benchmarks.md
    python benchmarks/run.py --update-docs --from-json bench.json   # the page and plot from an earlier run

``--update-docs`` rewrites only what lies between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in
docs/benchmarks.md; the JSON goes where ``--json`` says (default ``bench.json`` in the current directory).
"""

import json
import sys
from pathlib import Path

from distclip._tools import bench, cli

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
IMAGE = ROOT / "docs" / "img" / "bench.png"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def main(argv: list[str]) -> int:
    update_docs = "--update-docs" in argv
    argv = [a for a in argv if a != "--update-docs"]
    if "--from-json" in argv:
        i = argv.index("--from-json")
        if not update_docs or i + 1 >= len(argv):
            print("benchmarks/run.py: --from-json PATH goes with --update-docs", file=sys.stderr)
            return 2
        with open(argv[i + 1]) as f:
            report = json.load(f)
        skipped = bench.plot(report, str(IMAGE))
        print(skipped or f"wrote {IMAGE.relative_to(ROOT)}")
        return _update_page(report, "img/bench.png")
    if update_docs and not any(a == "--plot" or a.startswith("--plot=") for a in argv):
        argv += ["--plot", str(IMAGE)]
    args = cli._parser().parse_args(["bench", *argv])
    config = cli._bench_config(args)
    command = " ".join(["python benchmarks/run.py", *(["--update-docs"] if update_docs else []),
                        *(a for a in argv if a != str(IMAGE) and not (a == "--plot" and update_docs))])
    status = bench.run(config, command)
    if status != 0 or not update_docs:
        return status
    if not config.json_path:
        print("benchmarks/run.py: --update-docs needs the JSON (do not pass --json '')", file=sys.stderr)
        return 2
    with open(config.json_path) as f:
        report = json.load(f)
    image = Path(config.plot_path).resolve() if config.plot_path else None
    relative = str(image.relative_to(PAGE.parent)) if image and image.is_relative_to(PAGE.parent) else None
    return _update_page(report, relative)


def _update_page(report: dict, image: str | None) -> int:
    """Replace what lies between the markers of docs/benchmarks.md with the report as markdown."""
    page = PAGE.read_text()
    if BEGIN not in page or END not in page:
        print(f"benchmarks/run.py: {PAGE} has no {BEGIN} ... {END} section", file=sys.stderr)
        return 2
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{bench.markdown(report, image)}{END}{tail}")
    print(f"updated {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
