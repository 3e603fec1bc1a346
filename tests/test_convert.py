"""superd convert: inetd.conf and xinetd files to superd YAML.

Each test converts a fixture, loads the result with yaml.safe_load and
asserts on the values, checks the comments for what could not be carried
over, and loads the output with superd's own configuration reader (or
``superd check``) so that the converted file is one superd accepts.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, run_superd, tcp_exchange, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superd import config, fields
from superd.convert import ConvertError, convert
from superd.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"
# Not as root, superd refuses ports below net.ipv4.ip_unprivileged_port_start
# and users other than its own: the sources' users and well-known ports are
# then refused, as they would fail to run.
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="the converted file names users and ports only root can give")
SELF = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
LOWEST_PORT = max(1, fields.lowest_bindable_port())
DEBIAN_XINETD = FIXTURES / "debian-xinetd"


def write(path: Path, text: str) -> Path:
    """A file superd accepts even as root: ours, mode 0644."""
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


ROOT_ONLY_PROBLEMS = ("cannot be given: superd runs as", "(net.ipv4.ip_unprivileged_port_start)")


def load_output(tmp_path: Path, text: str) -> config.Config:
    """The converted file, loaded as superd would.  Not as root, a file whose
    only problems are what a root superd could apply (inetd.conf's users, its
    well-known ports) skips the test with that reason; any other problem fails."""
    try:
        return config.load(str(write(tmp_path / "superd.yaml", text)))
    except config.ConfigError as e:
        root_only = all(any(m in str(p) for m in ROOT_ONLY_PROBLEMS) for p in e.problems)
        if os.geteuid() != 0 and root_only:
            pytest.skip("needs root: the converted file names users or ports only root "
                        "may use, as inetd.conf does")
        raise


def services(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)["services"] or {}


def block(text: str, name: str) -> str:
    """The comment lines and body of one service in the output."""
    chunks = text.split("\n\n")
    found = [c for c in chunks if f"\n  {name}:" in c or f"\n  # {name}:" in c]
    assert found, f"no service {name!r} in:\n{text}"
    return found[0]


def debian_xinetd(tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    """Debian's /etc/xinetd.conf and xinetd.d, with includedir pointed here."""
    incdir = tmp_path / "xinetd.d"
    shutil.copytree(DEBIAN_XINETD / "xinetd.d", incdir)
    for name, body in (extra or {}).items():
        write(incdir / name, body)
    text = (DEBIAN_XINETD / "xinetd.conf").read_text()
    assert "includedir /etc/xinetd.d" in text
    return write(tmp_path / "xinetd.conf", text.replace("/etc/xinetd.d", str(incdir)))


# --- the files Debian ships ----------------------------------------------


def test_debian_xinetd_package_files_convert_and_pass_check(tmp_path: Path) -> None:
    main = debian_xinetd(tmp_path, {"echo.dpkg-old": "garbage\n", "echo~": "garbage\n"})
    out = convert([str(main)])
    assert out.startswith("# superd configuration converted by superd convert from:")
    assert str(main) in out.splitlines()[1]
    svc = services(out)
    for name in ("chargen", "daytime", "discard", "echo", "time"):
        assert svc[f"{name}-stream"] == {"enabled": False, "listen": socket.getservbyname(
            name, "tcp"), "internal": name}
        assert svc[f"{name}-dgram"]["protocol"] == "udp"
        # the *-udp files repeat the id; the copy gets a name of its own
        assert svc[f"{name}-dgram-2"]["internal"] == name
        assert "wait" not in svc[f"{name}-dgram"] and "user" not in svc[f"{name}-stream"]
    assert "servers" not in svc and "services" not in svc
    assert "NOT CONVERTED: xinetd internal service 'servers'" in block(out, "servers")
    assert "skipped echo.dpkg-old, echo~" in out
    assert "xinetd ignores names that contain '.' or end in '~'" in out
    result = run_superd("check", "-c", str(write(tmp_path / "superd.yaml", out)))
    assert result.returncode == 0, result.stderr
    assert "echo-stream" in result.stdout


def test_debian_xinetd_d_files_given_one_by_one(tmp_path: Path) -> None:
    paths = sorted(str(p) for p in (DEBIAN_XINETD / "xinetd.d").iterdir())
    out = convert(paths)
    assert all(p in out for p in paths)
    assert len(services(out)) == 15
    load_output(tmp_path, out)


def test_debian_inetd_conf_from_update_inetd(tmp_path: Path) -> None:
    out = convert([str(FIXTURES / "debian-inetd.conf")])
    svc = services(out)
    assert svc["telnet"] == {"listen": 23, "exec": ["/usr/sbin/in.telnetd"], "user": "root"}
    assert "tcpd (TCP wrappers) dropped" in block(out, "telnet")
    assert svc["ftp"]["enabled"] is False
    assert "#<off>#" in block(out, "ftp")
    assert svc["talk"] == {"listen": 517, "protocol": "udp", "exec": ["/usr/sbin/in.talkd"],
                           "user": "nobody", "group": "tty"}
    assert svc["ident"]["wait"] is True
    assert svc["tftp"]["listen"] == "0.0.0.0:69"
    assert svc["tftp"]["exec"] == ["/usr/sbin/in.tftpd", "-s", "/srv/tftp"]
    assert svc["rsync"]["exec"] == ["/usr/bin/rsync", "--daemon"]
    assert "argv[0] was 'rsyncd'" in block(out, "rsync")
    assert "discard" not in svc  # a single '#' is the admin's own comment
    # swat is not in /etc/services: left commented out, limits carried anyway
    assert "swat" not in svc
    assert "NOT CONVERTED: 'swat' is not a port number" in block(out, "swat")
    assert "#   rate: 400/min\n  #   burst: 400" in block(out, "swat")
    # the only things superd refuses are programs and users this machine lacks
    # (and, not as root, the users and ports only root can give)
    refused = ("does not exist", "no user") + (
        () if os.geteuid() == 0 else ("cannot be given", "is below"))
    with pytest.raises(ConfigError) as e:
        load_output(tmp_path, out)
    for problem in e.value.problems:
        assert any(why in problem.message for why in refused), problem


# --- inetd.conf, each form -------------------------------------------------


@pytest.fixture(scope="module")
def tricky_inetd() -> str:
    return convert([str(FIXTURES / "tricky-inetd.conf")])


def test_inetd_internal_services(tricky_inetd: str) -> None:
    svc = services(tricky_inetd)
    assert svc["echo"] == {"listen": 7, "internal": "echo"}
    assert svc["echo-udp"] == {"listen": 7, "protocol": "udp", "internal": "echo"}
    assert svc["sink"]["internal"] == "discard"  # an /etc/services alias
    assert "tcpmux" not in svc
    assert "internal service 'tcpmux' has no superd equivalent" in tricky_inetd


def test_inetd_protocol_families_and_rate(tricky_inetd: str) -> None:
    svc = services(tricky_inetd)
    assert svc["2323"] == {"listen": "[::]:2323", "exec": ["/bin/cat", "-u"],
                           "user": "nobody", "group": "nogroup", "rate": "120/min",
                           "burst": 120}
    assert "at most 120 starts a minute" in block(tricky_inetd, "'2323'")
    assert "120 clients are served at once" in block(tricky_inetd, "'2323'")
    assert svc["2929"]["listen"] == 2929
    assert "rcvbuf=64k,sndbuf=1m: superd does not set socket buffer sizes" in tricky_inetd


def test_inetd_overlapping_entries_are_disabled(tricky_inetd: str) -> None:
    svc = services(tricky_inetd)
    assert svc["2323-tcp"]["enabled"] is False
    assert "listens where service '2323' does" in block(tricky_inetd, "2323-tcp")


def test_inetd_addresses(tricky_inetd: str) -> None:
    svc = services(tricky_inetd)
    assert svc["2424"]["listen"] == ["127.0.0.1:2424", "[::1]:2424"]
    assert "argv[0] was 'mycat'" in block(tricky_inetd, "'2424'")
    # a line holding only "127.0.0.1:" sets the address of the lines after it
    assert svc["2525"] == {"listen": "127.0.0.1:2525", "exec": ["/bin/cat"], "wait": True,
                           "user": "nobody", "group": "nogroup"}
    assert svc["daytime"]["listen"] == "127.0.0.1:13"
    assert svc["2929"]["listen"] == 2929  # after "*:"
    assert svc["2828"]["enabled"] is False
    assert "'localhost' is a host name" in block(tricky_inetd, "'2828'")


def test_inetd_udp_nowait_and_unix_and_off(tricky_inetd: str) -> None:
    svc = services(tricky_inetd)
    assert svc["2626"]["protocol"] == "udp" and "wait" not in svc["2626"]
    assert "nowait on a datagram service" in block(tricky_inetd, "'2626'")
    assert svc["cat.sock"]["listen"] == "/run/superd-convert-test/cat.sock"
    assert svc["2727"]["enabled"] is False


def test_inetd_freebsd_limits_tcpd_and_unsupported(tricky_inetd: str) -> None:
    svc = services(tricky_inetd)
    assert svc["3030"]["max_connections"] == 4 and svc["3030"]["per_source"] == 2
    assert "10 connections per source per minute" in block(tricky_inetd, "'3030'")
    assert svc["3232"]["exec"] == ["/bin/cat"]
    assert "tcpd (TCP wrappers) dropped" in block(tricky_inetd, "'3232'")
    assert "rstatd-1-3" not in svc and "Sun RPC" in block(tricky_inetd, "rstatd-1-3")
    assert "3131" not in svc and "socket type 'raw'" in tricky_inetd


def test_inetd_overlaps_follow_superds_rule(tmp_path: Path) -> None:
    source = write(tmp_path / "inetd.conf", (
        "*,127.0.0.1:3333 stream tcp nowait nobody /bin/cat cat\n"
        "3434 stream tcp4 nowait nobody /bin/cat cat\n"
        "127.0.0.1:3434 stream tcp nowait nobody /bin/cat cat\n"
        "::1:3434 stream tcp nowait nobody /bin/cat cat\n"))
    out = convert([str(source)])
    svc = services(out)
    assert svc["3333"]["listen"] == 3333
    assert "listen address 127.0.0.1 dropped" in block(out, "'3333'")
    assert svc["3434"]["listen"] == "0.0.0.0:3434"
    assert svc["3434-tcp"]["enabled"] is False  # 0.0.0.0 covers 127.0.0.1
    assert svc["3434-2"]["listen"] == "[::1]:3434"  # another family: no overlap
    assert "enabled" not in svc["3434-2"]
    load_output(tmp_path, out)


@ROOT_ONLY
def test_tricky_inetd_loads(tricky_inetd: str, tmp_path: Path) -> None:
    cfg = load_output(tmp_path, tricky_inetd)
    assert cfg.service("2323").rate == 2.0
    assert cfg.service("2323").burst == 120


# --- xinetd, each attribute ------------------------------------------------


@pytest.fixture(scope="module")
def tricky_xinetd() -> str:
    return convert([str(FIXTURES / "tricky-xinetd.conf")])


def test_xinetd_defaults_section(tricky_xinetd: str) -> None:
    defaults = yaml.safe_load(tricky_xinetd)["defaults"]
    assert defaults == {"max_connections": 30, "per_source": 5, "rate": 25, "umask": "027",
                        "allow": ["127.0.0.1", "10.0.0.0/8", "192.168.1.0/24"],
                        "deny": ["10.9.9.9"], "pass_env": ["LANG"]}
    for dropped in ("log_type = SYSLOG", "log_on_success", "banner = /etc/issue.net",
                    "groups = yes"):
        assert f"# defaults: {dropped}" in tricky_xinetd
    assert "turned the service off for 30 s, superd pauses" in tricky_xinetd


def test_xinetd_service_mapping(tricky_xinetd: str) -> None:
    cat = services(tricky_xinetd)["cat"]
    assert cat == {
        "listen": "127.0.0.1:4001", "exec": ["/bin/cat", "-u"], "user": "nobody",
        "group": "nogroup", "env": {"LANG": "C.UTF-8", "GREETING": "hi", "EXTRA": "1"},
        "pass_env": ["LANG", "TZ"], "umask": "077", "nice": 5,
        "rlimits": {"as": "8M", "cpu": 20, "nofile": 64, "data": "unlimited",
                    "stack": "512K"},
        "max_connections": 8, "per_source": 8,
        "allow": ["127.0.0.1", "10.0.0.0/8", "192.168.1.0/24", "172.16.1.0/24",
                  "172.16.2.0/24"],
        "deny": [], "keepalive": True, "nodelay": True}


def test_xinetd_comments_for_what_superd_does_not_do(tricky_xinetd: str) -> None:
    text = block(tricky_xinetd, "cat")
    for expected in ("flags IDONLY", "dropped .example.com trusted.example.org",
                     "never resolves names", "rlimit_rss", "log_on_failure",
                     "access_times", "max_load", "libwrap", "mdns",
                     "per_source = UNLIMITED"):
        assert expected in text, expected
    assert "forward:" not in services(tricky_xinetd)
    assert "redirect = 10.0.0.5 80" in block(tricky_xinetd, "forward")
    assert "Sun RPC" in block(tricky_xinetd, "rstatd")
    assert "SENSOR" in block(tricky_xinetd, "trap")
    assert "TCPMUX" in block(tricky_xinetd, "myorg_server")
    assert "type = UNLISTED" in block(tricky_xinetd, "cat6")


def test_xinetd_listen_wait_and_tcpd(tricky_xinetd: str) -> None:
    svc = services(tricky_xinetd)
    assert svc["cat6"] == {"listen": "[::1]:4002", "exec": ["/bin/cat"], "wait": True,
                           "user": "nobody"}
    assert svc["wrapped"]["exec"] == ["/bin/cat", "-u"]
    assert "tcpd (TCP wrappers) dropped" in block(tricky_xinetd, "wrapped")


def test_xinetd_disabled_services(tricky_xinetd: str) -> None:
    svc = services(tricky_xinetd)
    assert svc["echo-stream"] == {"enabled": False, "listen": "127.0.0.1:7",
                                  "internal": "echo"}
    assert "xinetd served nobody" in block(tricky_xinetd, "echo-stream")
    assert svc["daytime"]["enabled"] is False  # bind = localhost, a name
    assert svc["oldsvc"]["enabled"] is False
    assert "listed in defaults' disabled" in block(tricky_xinetd, "oldsvc")
    assert "wait = no on a udp service" in block(tricky_xinetd, "oldsvc")


def test_xinetd_address_forms_and_deny_wins(tricky_xinetd: str) -> None:
    narrow = services(tricky_xinetd)["narrow"]
    assert narrow["allow"] == ["10.1.2.3", "0.0.0.0/0", "::/0"]
    assert narrow["deny"] == ["10.0.0.0/8"]
    assert narrow["rate"] == 2.5
    assert "superd's deny always wins" in block(tricky_xinetd, "narrow")


def test_xinetd_repeated_attributes_and_overlap(tricky_xinetd: str) -> None:
    second = services(tricky_xinetd)["second"]
    assert second["user"] == "nobody" and second["enabled"] is False
    text = block(tricky_xinetd, "second")
    assert "user set twice; xinetd keeps the first" in text
    assert "'+=' does not apply to nice" in text
    assert "frobnicate = yes: unknown xinetd attribute" in text
    assert "listens where service 'first' does" in text


@ROOT_ONLY
def test_tricky_xinetd_passes_check(tricky_xinetd: str, tmp_path: Path) -> None:
    result = run_superd("check", "-c", str(write(tmp_path / "superd.yaml", tricky_xinetd)))
    assert result.returncode == 0, result.stderr
    cfg = load_output(tmp_path, tricky_xinetd)
    assert cfg.service("cat").umask == 0o077


def test_xinetd_include_and_flags(tmp_path: Path) -> None:
    write(tmp_path / "more.conf", "service extra\n{\n\tport = 4100\n\tsocket_type = stream\n"
          "\twait = no\n\tuser = nobody\n\tserver = /bin/cat\n\tflags = IPv4\n}\n")
    main = write(tmp_path / "main.conf", "include more.conf\n"
                 "service echo\n{\n\ttype = INTERNAL\n\tsocket_type = dgram\n\twait = yes\n"
                 "\tport = 4101\n\tinterface = 127.0.0.1\n\tflags = KEEPALIVE\n}\n")
    out = convert([str(main)])
    svc = services(out)
    assert svc["extra"]["listen"] == "0.0.0.0:4100"
    assert svc["echo"] == {"listen": "127.0.0.1:4101", "protocol": "udp", "internal": "echo"}
    assert "flags KEEPALIVE: applies to tcp only" in block(out, "echo")
    assert str(tmp_path / "more.conf") in out.split("\n\n")[0]


# --- errors and format detection -------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("hello world\n", ":1: neither an inetd.conf entry"),
    ("# only comments\n\n", "no inetd.conf entries or xinetd services"),
    ("echo stream tcp nowait root internal\nftp stream tcp\n", ":2: neither"),
    ("echo stream tcp sometimes root internal\n", ":1: 'sometimes' is not wait"),
    ("service echo\n{\n\ttype = INTERNAL\n", ":1: 'service echo' has no closing '}'"),
    ("service echo\n\ttype = INTERNAL\n}\n", ":1: 'service echo' must be followed"),
    ("service echo\n{\n\tthis is not an attribute\n}\n", ":3: expected 'attribute = value'"),
    ("defaults\n{\n}\nbogus line\n", ":4: expected 'service NAME'"),
    ("includedir /nonexistent/xinetd.d\n", ":1: includedir /nonexistent/xinetd.d: No such"),
    ("include missing.conf\n", ":1: include missing.conf: "),
    ("include input.conf\n", ":1: include input.conf: already read"),
])
def test_convert_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "input.conf", text)
    with pytest.raises(ConvertError) as e:
        convert([str(path)])
    assert str(path) in str(e.value)
    assert message in str(e.value)


def test_unreadable_file_and_no_file() -> None:
    with pytest.raises(ConvertError, match="/nonexistent/inetd.conf: cannot read"):
        convert(["/nonexistent/inetd.conf"])
    with pytest.raises(ConvertError, match="no file given"):
        convert([])


def test_format_is_told_by_content_not_name(tmp_path: Path) -> None:
    xi = write(tmp_path / "inetd.conf", "service echo {\n\ttype = INTERNAL\n"
               "\tsocket_type = stream\n\twait = no\n}\n")
    inetd = write(tmp_path / "xinetd.conf", "echo stream tcp nowait root internal\n")
    both = services(convert([str(xi), str(inetd)]))
    assert both == {"echo": {"listen": 7, "internal": "echo"},
                    "echo-tcp": {"enabled": False, "listen": 7, "internal": "echo"}}


_WORD = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
                min_size=1, max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(_WORD, max_size=5), port=st.integers(LOWEST_PORT, 65535))
def test_any_argv_survives_the_yaml(tmp_path: Path, args: list[str], port: int) -> None:
    line = f"127.0.0.1:{port} stream tcp nowait {SELF} /bin/cat cat {' '.join(args)}\n"
    out = convert([str(write(tmp_path / "inetd.conf", line))])
    assert services(out) == {str(port): {"listen": f"127.0.0.1:{port}",
                                         "exec": ["/bin/cat", *args], "user": SELF}}
    assert load_output(tmp_path, out).service(str(port)).exec == ("/bin/cat", *args)


# --- round trip: the converted file served by the real daemon --------------


def test_round_trip_inetd_echo_and_cat(tmp_path: Path, superd: Any) -> None:
    port, cat_port = free_port(), free_port()
    user = SELF
    source = write(tmp_path / "inetd.conf", (
        "# inetd.conf for the round trip\n"
        "127.0.0.1:\n"
        f"{port}\tstream\ttcp\tnowait\troot\tinternal\techo\n"
        f"{port}\tdgram\tudp\twait\troot\tinternal\techo\n"
        f"{cat_port}\tstream\ttcp\tnowait\t{user}\t/bin/cat\tcat\n"))
    out = convert([str(source)])
    assert services(out) == {
        str(port): {"listen": f"127.0.0.1:{port}", "internal": "echo"},
        f"{port}-udp": {"listen": f"127.0.0.1:{port}", "protocol": "udp",
                        "internal": "echo"},
        str(cat_port): {"listen": f"127.0.0.1:{cat_port}", "exec": ["/bin/cat"],
                        "user": user}}
    superd(out)
    assert tcp_exchange(port, b"echo me\n") == b"echo me\n"
    assert tcp_exchange(cat_port, b"cat me\n" * 100) == b"cat me\n" * 100
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind(("127.0.0.1", 0))
        s.sendto(b"datagram", ("127.0.0.1", port))
        assert s.recvfrom(100)[0] == b"datagram"


def _status(config_path: Path) -> dict[str, Any]:
    result = run_superd("status", "--json", "-c", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _service_status(config_path: Path, name: str) -> dict[str, Any]:
    return next(s for s in _status(config_path)["services"] if s["name"] == name)


def test_inetd_nowait_n_serves_n_clients_at_once(tmp_path: Path, superd: Any) -> None:
    """OpenBSD/netkit inetd's nowait.N: at most N starts a minute, and N
    clients arriving together are all served at once.  Converted to a rate
    of N a minute with a burst of one, the 2nd and 3rd client each waited a
    rate interval (20 s here)."""
    port, n = free_port(), 3
    user = SELF
    source = write(tmp_path / "inetd.conf",
                   f"127.0.0.1:{port} stream tcp nowait.{n} {user} /bin/echo echo served\n")
    out = convert([str(source)])
    assert services(out) == {str(port): {
        "listen": f"127.0.0.1:{port}", "exec": ["/bin/echo", "served"], "user": user,
        "rate": f"{n}/min", "burst": n}}  # no on_limit: superd's default, queue
    d = superd(out)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        # a rate interval is 20 s: a client that had to wait one times out here
        replies = [_read_all(c) for c in clients]
    except TimeoutError:
        pytest.fail(f"a client waited for a rate interval: the burst is not {n}\n{d.log()}")
    finally:
        for c in clients:
            c.close()
    assert replies == [b"served\n"] * n, d.log()
    assert _service_status(d.config_path, str(port))["accepted"] == n
    # the N+1th within the minute waits in the listen queue (on_limit: queue):
    # neither served nor refused while the bucket refills
    with socket.create_connection(("127.0.0.1", port), timeout=10) as late:
        assert wait_until(lambda: _service_status(d.config_path, str(port))["listeners"]
                          == [{"address": f"127.0.0.1:{port}/tcp",
                               "state": "paused by rate"}], 10), _status(d.config_path)
        state = _service_status(d.config_path, str(port))
        assert (state["accepted"], state["rejected"]) == (n, {}), state
        late.setblocking(False)
        with pytest.raises(BlockingIOError):  # no reply yet, and no EOF: still queued
            late.recv(100)
    assert "refused" not in d.log(), d.log()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("service", ["tcpmux/+hello", "tcpmux/hello", "127.0.0.1:tcpmux/+hi"])
def test_inetd_tcpmux_entries_are_labelled_tcpmux(tmp_path: Path, service: str) -> None:
    """FreeBSD's tcpmux/NAME (and +NAME) entries are RFC 1078 TCPMUX
    services, reached by name through port 1: not Sun RPC."""
    source = write(tmp_path / "inetd.conf",
                   f"{service} stream tcp nowait nobody /bin/cat cat\n"
                   "rstatd/1-3 dgram rpc/udp wait root /usr/sbin/rpc.rstatd rpc.rstatd\n")
    out = convert([str(source)])
    name = service.rpartition("/")[2]
    text = block(out, name.lstrip("+"))
    assert "Sun RPC" not in text, text
    assert (f"NOT CONVERTED: TCPMUX (RFC 1078) service '{name.lstrip('+')}': clients "
            "reach it by name through the tcpmux service on port 1, and superd has no "
            "TCPMUX multiplexer") in text, text
    assert ("Sun RPC services are not supported"
            in block(out, "rstatd-1-3"))  # RPC is still RPC
    assert services(out) == {}


# --- found by fuzzing (fuzz/convert_inetd.py, fuzz/convert_xinetd.py) --------


def test_control_characters_in_the_source_stay_inside_their_comment(tmp_path: Path) -> None:
    # a control character copied into a comment made superd refuse the whole output
    # ("control characters are not allowed")
    source = write(tmp_path / "inetd.conf", "x\x11y\x7f stream tcp nowait root internal \x9b\n"
                   "7007 stream tcp nowait root internal echo\n")
    out = convert([str(source)])
    assert "\x11" not in out and "\x7f" not in out and "\x9b" not in out
    assert "NOT CONVERTED" in block(out, "x-y") and "x\\x11y\\x7f" in block(out, "x-y")
    assert load_output(tmp_path, out).service("7007") is not None


def test_control_characters_in_an_included_file_name(tmp_path: Path) -> None:
    incdir = tmp_path / "xinetd.d"
    incdir.mkdir()
    write(incdir / "echo\x1b", "service echo\n{\n\ttype = INTERNAL\n\tsocket_type = stream\n"
          "\twait = no\n}\n")
    main = write(tmp_path / "xinetd.conf", f"includedir {incdir}\n")
    out = convert([str(main)])
    assert f"{incdir}/echo\\x1b" in out.split("\n\n")[0]
    assert services(out) == {"echo": {"listen": 7, "internal": "echo"}}


@pytest.mark.parametrize("name, text, line", [
    ("inetd.conf", "echo stream tcp nowait root internal\n7 stream tcp nowait ro\0ot /bin/cat\n",
     2),
    ("xinetd.conf", "service echo\n{\n\tuser = ro\0ot\n}\n", 3),
])
def test_a_nul_byte_is_an_error_naming_file_and_line(tmp_path: Path, name: str, text: str,
                                                     line: int) -> None:
    # pwd.getpwnam() and open() raised ValueError ("embedded null byte")
    path = write(tmp_path / name, text)
    with pytest.raises(ConvertError, match=f"{path}:{line}: a NUL byte"):
        convert([str(path)])


def test_xinetd_include_with_a_nul_byte(tmp_path: Path) -> None:
    write(tmp_path / "more.conf", "service echo\n{\n\tserver = /bin/c\0at\n}\n")
    main = write(tmp_path / "main.conf", "include more.conf\n")
    with pytest.raises(ConvertError, match="main.conf:1: include more.conf: .*more.conf:3: "
                       "a NUL byte"):
        convert([str(main)])


def test_xinetd_dotted_quads_that_are_no_address_are_dropped(tmp_path: Path) -> None:
    # '09.9.9.9' and '300.1.2.3' were written out as deny: entries (and with only_from
    # also given, ipaddress.ip_network raised ValueError)
    source = write(tmp_path / "xinetd.conf", (
        "service cat\n{\n\ttype = UNLISTED\n\tsocket_type = stream\n\twait = no\n"
        "\tuser = nobody\n\tserver = /bin/cat\n\tport = 4100\n"
        "\tonly_from = 10.0.0.0/8 300.1.2.3\n\tno_access = 09.9.9.9 10.9.9.9 1.2.3.{4,05}\n}\n"))
    out = convert([str(source)])
    cat = services(out)["cat"]
    assert cat["allow"] == ["10.0.0.0/8"]
    assert cat["deny"] == ["10.9.9.9"]
    assert "no_access: dropped 09.9.9.9 1.2.3.{4,05}" in " ".join(block(out, "cat").split())
    assert load_output(tmp_path, out).service("cat") is not None


def test_xinetd_attributes_with_no_value(tmp_path: Path) -> None:
    # 'server =' with nothing after it raised IndexError (so would 'id =')
    source = write(tmp_path / "xinetd.conf", (
        "service narrow\n{\n\ttype = UNLISTED\n\tsocket_type = stream\n\twait = no\n"
        "\tuser = nobody\n\tport = 4100\n\tserver =\n\tid =\n}\n"))
    out = convert([str(source)])
    assert "NOT CONVERTED: no server given" in block(out, "narrow")


@pytest.mark.parametrize("cps", ["nan 10", "inf", "-inf", "1e999 5", "0", "-3"])
def test_xinetd_cps_that_is_no_rate(tmp_path: Path, cps: str) -> None:
    # nan and inf were written as rate: .nan / .inf
    source = write(tmp_path / "xinetd.conf", (
        "service cat\n{\n\ttype = UNLISTED\n\tsocket_type = stream\n\twait = no\n"
        f"\tuser = nobody\n\tserver = /bin/cat\n\tport = 4100\n\tcps = {cps}\n}}\n"))
    out = convert([str(source)])
    assert "rate" not in services(out)["cat"]
    assert f"cps = {cps}: not a rate; not carried over" in block(out, "cat")
    assert load_output(tmp_path, out).service("cat") is not None
