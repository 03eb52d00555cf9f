"""Real-terminal smoke test: `zkv-mlx chat` on the bundled model inside tmux (apt package: tmux).

tmux gives the app a real pseudo-terminal; the test types a question and waits for the reply on screen, pastes a
message of several lines (a bracketed paste, as a terminal sends it) and checks that it is sent whole, resizes the
terminal live (120x36 -> 80x24 -> 30x8) and checks the panels give way while the message box stays, then quits
with Ctrl+Q and checks the process exited cleanly.
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
    # COLUMNS/LINES reach the pane from the test process's C-level environment (not os.environ) and would pin
    # the app to 80x24 (Textual sizes itself with shutil.get_terminal_size): unset them so the pty size rules.
    cmd = (f"env -u COLUMNS -u LINES '{sys.executable}' -m zkv_mlx.cli chat --temp 0 --max-tokens 24; "
           f"echo $? > '{exit_file}'")
    # The tmux server inherits this process's environment (the isolated ZKV_* dirs of conftest.py).
    started = tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "36", cmd)
    assert started.returncode == 0, started.stderr
    # Without a client attached, tmux sizes windows by its default-size (80x24): make 120x36 explicit.
    tmux("resize-window", "-t", "chat", "-x", "120", "-y", "36")
    try:
        # The model is loaded (the status line says so); at 120 columns both panels show.
        wait_for(tmux, lambda t: "ready ·" in t and "KV cache" in t and "unsaved chat" in t, timeout=90)
        tmux("send-keys", "-t", "chat", "-l", "What is the capital of France?")
        tmux("send-keys", "-t", "chat", "Enter")
        screen = wait_for(tmux, lambda t: "TTFT" in t, timeout=60)  # the metrics line ends a reply
        assert "What is the capital of France?" in screen
        assert "Paris" in screen  # greedy decoding of the bundled model

        # A bracketed paste of three lines (-p: wrapped in the paste markers, line ends sent as CR).
        tmux("set-buffer", "-b", "lines", "First pasted line\nSecond pasted line\nThird pasted line")
        tmux("paste-buffer", "-p", "-d", "-b", "lines", "-t", "chat")
        wait_for(tmux, lambda t: "Third pasted line" in t, timeout=10)  # all three in the message box
        tmux("send-keys", "-t", "chat", "Enter")
        screen = wait_for(tmux, lambda t: t.count("TTFT") >= 2, timeout=60)
        lines = screen.splitlines()
        first = next(i for i, line in enumerate(lines) if "First pasted line" in line)
        # The message reached the chat whole, one line under the other (not cut to its first line).
        assert "Second pasted line" in lines[first + 1] and "Third pasted line" in lines[first + 2]

        # Live resize: below 110 columns the cache panel goes, below 80 the sidebar too; the box stays.
        tmux("resize-window", "-t", "chat", "-x", "80", "-y", "24")
        wait_for(tmux, lambda t: "KV cache" not in t and "unsaved chat" in t and "Message" in t
                 and max(map(len, t.splitlines())) <= 80, timeout=15)
        tmux("resize-window", "-t", "chat", "-x", "30", "-y", "8")
        # The sidebar is gone; the message box (its placeholder) is still on screen.
        wait_for(tmux, lambda t: "unsaved chat" not in t and "Message" in t and len(t.splitlines()) <= 8,
                 timeout=15)
        tmux("send-keys", "-t", "chat", "-l", "still here")
        wait_for(tmux, lambda t: "still here" in t, timeout=10)
        tmux("send-keys", "-t", "chat", "C-q")
        end = time.monotonic() + 30
        while not (exit_file.exists() and exit_file.read_text().strip()) and time.monotonic() < end:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0"
    finally:
        tmux("kill-server")
