"""``python -m lmmfast``: fit an example model on a shipped dataset and print its summary."""
import time

import lmmfast


def main() -> None:
    df = lmmfast.datasets.load("sleepstudy")
    t0 = time.perf_counter()
    m = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", df)
    dt = time.perf_counter() - t0
    print(m.summary())
    print()
    print(f"lmmfast {lmmfast.__version__}: fitted in {dt * 1e3:.1f} ms "
          f"({m.optsummary.feval} objective evaluations)")


if __name__ == "__main__":
    main()
