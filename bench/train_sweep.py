"""Choose the built-in model's size and vocabulary by held-out loss per minute of training.

Each candidate trains for the same wall-clock minutes on this machine, from scratch, with the same
seed and data; the table compares held-out ELBO in bits per UTF-8 byte (comparable across
vocabularies) and masked cross-entropy. Run: ``python bench/train_sweep.py --minutes 3``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from training.loop import TrainConfig, train

CANDIDATES = {
    "d256-L6-v4k": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=688,
                        vocab_size=4096),
    "d384-L6-v4k": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024,
                        vocab_size=4096),
    "d384-L6-v8k": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024,
                        vocab_size=8192),
    "d256-L6-v8k": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=688,
                        vocab_size=8192),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=3000, help="schedule length, as in the real run")
    parser.add_argument("--warmup", type=int, default=20, help="short, so minutes compare learning, not warm-up")
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(out_dir=Path(out), steps=args.steps, max_minutes=args.minutes,
                                 warmup_steps=args.warmup,
                                 eval_every=10**9, checkpoint_every_s=10**9, **CANDIDATES[name])
            started = time.monotonic()
            result = train(config)
            rows.append({"candidate": name, "minutes": round((time.monotonic() - started) / 60, 1), **result})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'candidate':<14} {'steps':>6} {'bits/byte':>10} {'masked CE':>10}")
    for row in rows:
        print(f"{row['candidate']:<14} {row['step']:>6} {row['elbo_bits_per_byte']:>10} {row['masked_ce']:>10}")


if __name__ == "__main__":
    main()
