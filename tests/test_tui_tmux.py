"""Real-terminal smoke test: `zkv-mlx chat` on the bundled model inside tmux (apt package: tmux).

tmux gives the app a real pseudo-terminal of a fixed size; the test types a question, waits for the reply on
screen and quits with Ctrl+Q, then checks the process exited cleanly.
"""

import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"),
]


def wait_for(tmux, predicate, timeout: float) -> str:
    """Polls the pane until predicate(text) holds; returns the text (fails with the last screen)."""
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = tmux("capture-pane", "-p", "-t", "chat").stdout
        if predicate(text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s; the screen was:\n{text}")


def test_chat_in_a_real_terminal(tmp_path):
    socket = f"zkv-tui-{uuid.uuid4().hex[:8]}"  # a private tmux server: never touches the user's sessions

    def tmux(*args):
        return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=30)

    exit_file = tmp_path / "exit"
    cmd = (f"'{sys.executable}' -m zkv_mlx.cli chat --temp 0 --max-tokens 24; "
           f"echo $? > '{exit_file}'")
    # The tmux server inherits this process's environment (the isolated ZKV_* dirs of conftest.py).
    started = tmux("new-session", "-d", "-s", "chat", "-x", "100", "-y", "30", cmd)
    assert started.returncode == 0, started.stderr
    try:
        wait_for(tmux, lambda t: "ready ·" in t, timeout=90)  # model loaded, status line says so
        tmux("send-keys", "-t", "chat", "-l", "What is the capital of France?")
        tmux("send-keys", "-t", "chat", "Enter")
        screen = wait_for(tmux, lambda t: "TTFT" in t, timeout=60)  # the metrics line ends a reply
        assert "What is the capital of France?" in screen
        assert "Paris" in screen  # greedy decoding of the bundled model
        tmux("send-keys", "-t", "chat", "C-q")
        end = time.monotonic() + 30
        while not (exit_file.exists() and exit_file.read_text().strip()) and time.monotonic() < end:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0"
    finally:
        tmux("kill-server")
