"""Where a command's memory goes over time: runs `hfcompress ARGS...` in this process while a thread samples the
resident memory every few milliseconds, then prints the peak and the largest sample of every second.

A peak alone (what `ru_maxrss` and the compression record give) does not say which step caused it; the
timeline does: on a streamed GPTQ run each block shows as an attention stage, an MLP stage and a short spike at
the solve of its widest layer.

    python scripts/trace_memory.py quantize gptq MODEL OUT --bits 4 --group-size 128 --offload disk
    python scripts/trace_memory.py --interval 0.01 quantize rtn MODEL OUT --offload disk
"""

import argparse
import os
import runpy
import sys
import threading
import time


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    """(seconds since start, resident bytes) every `interval` seconds until `stop()`."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self):
        start = time.perf_counter()
        while not self._done.is_set():
            self.samples.append((time.perf_counter() - start, resident_bytes()))
            self._done.wait(self.interval)

    def stop(self):
        self._done.set()
        self.join()


def per_second(samples: list[tuple[float, int]]) -> dict[int, int]:
    largest: dict[int, int] = {}
    for seconds, rss in samples:
        largest[int(seconds)] = max(largest.get(int(seconds), 0), rss)
    return largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.003, help="Seconds between samples.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The hfcompress command and its arguments.")
    args = parser.parse_args()
    if not args.command:
        parser.error("give the hfcompress command to trace, e.g. quantize gptq MODEL OUT --offload disk")
    if sys.platform != "linux":
        parser.error(f"reads /proc/self/statm, which {sys.platform} does not have")

    sampler = Sampler(args.interval)
    sampler.start()
    sys.argv = ["hfcompress", *args.command]
    status = 0
    try:
        runpy.run_module("hfcompress", run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sampler.stop()
    timeline = per_second(sampler.samples)
    print(f"peak resident memory: {max(rss for _, rss in sampler.samples) / 2**20:,.0f} MiB")
    print("largest sample per second (s:MiB): " + " ".join(f"{s}:{rss / 2**20:.0f}" for s, rss in timeline.items()))
    return status


if __name__ == "__main__":
    sys.exit(main())
