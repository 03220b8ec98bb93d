"""A program in a real terminal for tests: a detached tmux session, its screen read with capture-pane.

Waiting is on the pane's output: ``pipe-pane`` copies everything the
program writes into a FIFO the test reads, so each wait blocks until the
screen changed (or the deadline passed), then looks at the screen again.
The shell around the program prints ``[exited N]`` when it ends.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

DEADLINE_S = 20.0


class Pane:
    """``Pane(argv, tmp_path, cols, lines)``: the program runs in tmux until ``close()``."""

    def __init__(self, command: str, tmp: Path, *, cols: int = 140, lines: int = 40, env: dict | None = None) -> None:
        self.tmux = shutil.which("tmux")
        if self.tmux is None:
            pytest.skip("tmux is not installed (Debian package tmux; .ci/run installs it)")
        self.name = f"mg-{uuid.uuid4().hex[:8]}"
        self.socket = str(tmp / "tmux.sock")
        self.fifo = tmp / f"{self.name}.out"
        os.mkfifo(self.fifo)
        self._fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.closed = False
        envs = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        # The shell waits for a go (so pipe-pane listens before the program draws), runs the program, and
        # says how it ended on the screen (the shell reaps it: nothing depends on tmux noticing the exit).
        self._run("new-session", "-d", "-s", self.name, "-x", str(cols), "-y", str(lines),
                  "sh", "-c", f'read go; env {envs} {command}; echo "[exited $?]"; exec sleep 3600', ";",
                  "pipe-pane", "-t", self.name, "-O", f"cat > {self.fifo}")
        self.keys("Enter")  # now that everything listens, the program starts

    def _run(self, *args: str) -> str:
        out = subprocess.run([self.tmux, "-S", self.socket, *args], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", self.name, *keys)

    def _drain(self, timeout: float) -> bool:
        """Wait for output (True) or end of file (False) within ``timeout``."""
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            self.closed = True
        return bool(data)

    def wait(self, pred: Callable[[str], bool], what: str, timeout: float = DEADLINE_S) -> str:
        """The screen once ``pred`` holds for it; fails with the last screen after ``timeout``."""
        deadline = time.monotonic() + timeout
        text = self.screen()
        while not pred(text):
            left = deadline - time.monotonic()
            if left <= 0:
                size = self._run("display-message", "-p", "-t", self.name, "#{window_width}x#{window_height}")
                raise AssertionError(f"timed out waiting for {what} ({size.strip()}); the screen:\n{text}")
            if not self._drain(left) and self.closed:
                raise AssertionError(f"the program ended while waiting for {what}; the screen:\n{text}")
            text = self.screen()
        return text

    def wait_exit(self, timeout: float = DEADLINE_S) -> int:
        """Wait until the program exits; its exit status (as the shell around it saw it)."""
        found = re.search(r"\[exited (\d+)\]", self.wait(lambda s: "[exited " in s, "the program to exit", timeout))
        assert found is not None
        return int(found.group(1))

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", self.socket, "kill-server"], capture_output=True, timeout=10)
        os.close(self._fd)
