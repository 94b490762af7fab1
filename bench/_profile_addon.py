"""A mitmproxy script for `python -m bench profile_proxy`: cProfile on the proxy's event loop,
switched on by SIGUSR1 and off (the stats written to $BENCH_PROFILE_OUT) by SIGUSR2, so start-up
and warm-up stay out of the profile. No hooks besides `running`: it costs the proxy nothing per
request."""

from __future__ import annotations

import asyncio
import cProfile
import os
import signal


class BenchProfiler:
    def __init__(self) -> None:
        self.profile: cProfile.Profile | None = None

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self.start)
        loop.add_signal_handler(signal.SIGUSR2, self.stop)

    def start(self) -> None:
        # The default (wall-clock) timer: a CPU-time timer is a system call per event, which
        # slows the proxy tenfold. Time blocked in epoll is left out by the reader.
        self.profile = cProfile.Profile()
        self.profile.enable()

    def stop(self) -> None:
        if self.profile is None:
            return
        self.profile.disable()
        out = os.environ["BENCH_PROFILE_OUT"]
        self.profile.dump_stats(out + ".part")
        os.replace(out + ".part", out)
        self.profile = None


addons = [BenchProfiler()]
