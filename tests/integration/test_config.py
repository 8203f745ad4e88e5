"""The command line and configuration checking: --version, --check, and one-line errors."""
import re
import socket
import subprocess

import pytest

from herald_util import HOST, REPO, config_text, free_port, herald_bin, make_config, populate


def run_herald(args, cwd=None, timeout=20):
    try:
        return subprocess.run([herald_bin()] + args, cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("herald %s did not exit within %d s (stderr %r)"
                             % (" ".join(args), timeout, e.stderr))


def one_line(stderr):
    text = stderr.decode("utf-8", "replace")
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), "expected exactly one stderr line, got %r" % text
    return lines[0]


INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+ (info|debug): ")


def error_line(stderr):
    """Startup may log informational lines before it fails; besides those, exactly one line."""
    text = stderr.decode("utf-8", "replace")
    lines = [ln for ln in text.rstrip("\n").split("\n") if not INFO_LOG.match(ln)]
    assert len(lines) == 1 and lines[0].strip(), "expected exactly one error line, got %r" % text
    return lines[0]


def good_config(tmp_path):
    populate(tmp_path)
    path = tmp_path / "herald.lua"
    path.write_text(config_text(make_config()))
    return path


def test_version():
    r = run_herald(["--version"])
    assert r.returncode == 0, r
    assert re.search(rb"herald\s+\d+\.\d+", r.stdout + r.stderr), r


def test_check_good_config(tmp_path):
    path = good_config(tmp_path)
    r = run_herald(["--check", "--config", str(path)])
    assert r.returncode == 0, r
    for pat in (b"AddressSanitizer", b"runtime error:", b"LeakSanitizer"):
        assert pat not in r.stderr


def test_check_good_config_relative_paths_from_another_cwd(tmp_path):
    """Relative paths in the file are relative to the file's directory, not the working one."""
    path = good_config(tmp_path / "conf")
    r = run_herald(["--check", "--config", str(path)], cwd="/")
    assert r.returncode == 0, r


def test_check_demo_config():
    r = run_herald(["--check", "--config", str(REPO / "herald.lua")], cwd=str(REPO))
    assert r.returncode == 0, r


# (name, file text, line that must be named, words the message must contain)
BAD_CONFIGS = [
    ("syntax_error",
     'listen = { host = "127.0.0.1", port = 8080 }\n'
     'web_root = nil\n'
     'limits = { max_message = 1024\n'
     'routes = {}\n',
     (3, 4), []),
    ("wrong_type",
     'web_root = nil\n'
     'listen = { host = "127.0.0.1", port = "eighty" }\n',
     (2,), ["listen.port", "number"]),
    ("unknown_key",
     'web_root = nil\n'
     'listen = { host = "127.0.0.1", port = 8080 }\n'
     'limits = { max_mesage = 1024 }\n',
     (3,), ["max_mesage"]),
    ("unknown_setting",
     'listen = { host = "127.0.0.1", port = 8080 }\n'
     'web_rot = "web"\n',
     (2,), ["web_rot"]),
    ("missing_script",
     'web_root = nil\n'
     'routes = { { path = "/chat", script = "scripts/nope.lua" } }\n',
     (2,), ["nope.lua"]),
    ("bad_tail_channel",
     'web_root = nil\n'
     'tail = { { path = "x.log", channel = "bad name" } }\n',
     (2,), ["bad name"]),
    ("port_out_of_range",
     'web_root = nil\n'
     'listen = { host = "127.0.0.1", port = 70000 }\n',
     (2,), ["listen.port", "70000"]),
    ("unknown_route_kind",
     'web_root = nil\n'
     'routes = { { path = "/x", kind = "bogus" } }\n',
     (2,), ["bogus"]),
    ("missing_web_root",
     'access_log = nil\n'
     'web_root = "no_such_dir"\n',
     (2,), ["no_such_dir"]),
]


@pytest.mark.parametrize("mode", ["check", "start"])
@pytest.mark.parametrize("name,text,lines,words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(tmp_path, mode, name, text, lines, words):
    path = tmp_path / "herald.lua"
    path.write_text(text)
    args = ["--config", str(path)] + (["--check"] if mode == "check" else ["--port", str(free_port())])
    r = run_herald(args, cwd=str(tmp_path))
    assert r.returncode != 0, r
    line = one_line(r.stderr)
    m = re.search(re.escape(str(path)) + r":(\d+):", line)
    assert m, "the message does not name %s:LINE: %r" % (path, line)
    assert int(m.group(1)) in lines, "wrong line in %r (expected %r)" % (line, lines)
    for w in words:
        assert w in line, "%r does not mention %r" % (line, w)


@pytest.mark.parametrize("mode", ["check", "start"])
def test_missing_config_file(tmp_path, mode):
    path = tmp_path / "nowhere.lua"
    args = ["--config", str(path)] + (["--check"] if mode == "check" else ["--port", str(free_port())])
    r = run_herald(args, cwd=str(tmp_path))
    assert r.returncode != 0, r
    line = one_line(r.stderr)
    assert str(path) in line, line


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-5"])
def test_bad_port_argument(tmp_path, port):
    path = good_config(tmp_path)
    r = run_herald(["--config", str(path), "--port", port])
    assert r.returncode != 0, r
    one_line(r.stderr)


def test_port_in_use(tmp_path):
    path = good_config(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = run_herald(["--config", str(path), "--port", str(port)], cwd=str(tmp_path))
    assert r.returncode != 0, r
    line = error_line(r.stderr)
    assert "in use" in line.lower(), line
    assert str(port) in line, line
