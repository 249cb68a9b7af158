"""`tessera bench serve --plot`: latency CDFs and output throughput over time, as one PNG.

matplotlib is imported only here, and only when a plot is asked for (`bench serve` checks
that it is installed before the run).
"""
import numpy as np

from server.bench_serve import Result

_THROUGHPUT_BINS = 40  # time bins of the throughput panel across the run


def plot(results: list[Result], duration: float, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, (cdf, rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in (("TTFT", [r.ttft for r in ok]),
                         ("TPOT", [r.tpot for r in ok if r.tpot is not None]),
                         ("E2E", [r.e2e for r in ok])):
        if values:
            ms = np.sort(np.array(values) * 1000)
            cdf.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=name)
    cdf.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of requests",
            title="latency CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend()
    # A streamed chunk is one token, or a few where the server held back an incomplete
    # character or a possible stop string.
    times = [r.start + r.ttft + t for r in ok for t in np.cumsum([0.0, *r.itl])]
    width = duration / _THROUGHPUT_BINS
    counts, edges = np.histogram(times, bins=_THROUGHPUT_BINS, range=(0, duration))
    rate.step(edges[:-1], counts / width, where="post")
    rate.set(xlabel="seconds since the first request", ylabel="output tok/s (streamed chunks)",
             title="output throughput over time")
    rate.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
