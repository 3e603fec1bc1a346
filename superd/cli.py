"""Command line: ``superd run`` and ``superd check``.

Only this module prints and chooses exit codes: 0 success, 1 configuration
refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import TextIO

from superd import config as configmod
from superd import log as logmod
from superd.config import Config, LogSettings, Service
from superd.errors import ConfigError

DEFAULT_CONFIG = "/etc/superd/superd.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `superd check | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superd", description="An inetd-style superserver.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                     help=f"configuration file (default {DEFAULT_CONFIG})")
    run.add_argument("--daemon", action="store_true",
                     help="detach (double fork) instead of running in the foreground")
    run.add_argument("--pidfile", metavar="F",
                     help="write the pid here (with --daemon: a locked pidfile; "
                          "default /run/superd.pid as root)")
    run.add_argument("--log-target", choices=("stderr", "syslog", "file"),
                     help="where the log goes, over the file's log: target "
                          "(a --daemon superd passes it on to its successor)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate the configuration and show it")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                     help=f"configuration file (default {DEFAULT_CONFIG})")
    check.set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="ask the running daemon what it is doing")
    status.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                     help=f"configuration file (default {DEFAULT_CONFIG})")
    status.add_argument("--json", action="store_true", help="print the raw JSON report")
    status.set_defaults(func=cmd_status)
    reload = sub.add_parser("reload", help="ask the running daemon to re-read its file")
    reload.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                     help=f"configuration file (default {DEFAULT_CONFIG})")
    reload.set_defaults(func=cmd_reload)
    convert = sub.add_parser("convert", help="print superd YAML for inetd.conf or xinetd files")
    convert.add_argument("files", nargs="+", metavar="FILE",
                         help="inetd.conf or xinetd files (xinetd.conf follows includedir)")
    convert.set_defaults(func=cmd_convert)
    explain = sub.add_parser("explain", help="what would happen to a client at ADDRESS")
    explain.add_argument("service", metavar="SERVICE", help="a service name in FILE")
    explain.add_argument("address", metavar="ADDRESS", help="ADDR, ADDR:PORT or [V6ADDR]:PORT")
    explain.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                     help=f"configuration file (default {DEFAULT_CONFIG})")
    explain.set_defaults(func=cmd_explain)
    return parser


def _load(path: str) -> Config | None:
    try:
        return configmod.load(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print(f"superd: {len(e.problems)} problem(s) in the configuration",
              file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from superd.spawn import SPAWN_PATH, ignored_text

    cfg = _load(args.config)
    if cfg is None:
        return 1
    print(f"configuration {cfg.path}: OK")
    for extra in cfg.files[1:]:
        print(f"  includes {extra}")
    print(f"  control {cfg.control}; max_connections {cfg.max_connections}; "
          f"stop_timeout {cfg.stop_timeout:g}s")
    print(f"  programs start through {SPAWN_PATH}")
    rows = [_row(s) for s in cfg.services]
    widths = [max(len(r[i]) for r in rows + [_HEADER]) for i in range(len(_HEADER))]
    for row in [_HEADER, *rows]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for svc in cfg.services:
        if svc.not_enforced:
            print(f"note: {svc.name}: {', '.join(svc.not_enforced)} "
                  "parsed but not yet enforced by this version")
        ident = svc.identity
        if ident is not None and ident.ignored:
            print(f"note: {svc.name}: {ignored_text(ident)}")
    return 0


_HEADER = ("SERVICE", "LISTEN", "PROTO", "WAIT", "USER", "PROGRAM")


def _row(svc: Service) -> tuple[str, ...]:
    listen = ",".join(str(a) for a in svc.listen)
    if not svc.enabled:
        listen = "(disabled)"
    program = f"internal {svc.internal}" if svc.internal else " ".join(
        _quote(a) for a in svc.exec)
    user = svc.identity.user if svc.identity and not svc.internal else "-"
    proto = "unix/" + ("dgram" if svc.datagram else "stream") if any(
        a.path for a in svc.listen) else svc.protocol
    return (svc.name, listen, proto, "yes" if svc.wait else "no", user, program)


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


def _control_path(path: str) -> str:
    """The control socket named by *path*, even if the file is now broken."""
    try:
        return configmod.load(path).control
    except ConfigError:
        pass
    try:
        with open(path, "rb") as f:
            raw = f.read(4 << 20)
    except OSError:
        return configmod.default_control_path()
    # the file was refused: read no YAML from it (it may be hostile, nested
    # too deep, say), only its top-level control: line
    found = re.search(rb"^control:\s*[\"']?([^\s\"'#]+)", raw, re.MULTILINE)
    if found:
        return found.group(1).decode(errors="replace")
    return configmod.default_control_path()


def _ask(args: argparse.Namespace, command: str) -> dict[str, object] | None:
    from superd.control import NotRunning, request
    from superd.paths import UnsafePath

    path = _control_path(args.config)
    try:
        return request(path, command)
    except NotRunning as e:
        print(f"superd: {e}", file=sys.stderr)
    except UnsafePath as e:  # never ask a socket someone else could have planted
        print(f"superd: not asking {path}: {e.strerror}", file=sys.stderr)
    except PermissionError:
        print(f"superd: permission denied on {path} (run as root or as superd's user)",
              file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"superd: no answer on {path}: {e}", file=sys.stderr)
    return None


def cmd_status(args: argparse.Namespace) -> int:
    from superd.status import add_usage, render

    reply = _ask(args, "status")
    if reply is None:
        return 1
    if not reply.get("ok"):
        print(f"superd: {reply.get('error')}", file=sys.stderr)
        return 1
    add_usage(reply)  # here, not in the daemon: walking /proc would stall its loop
    print(json.dumps(reply, indent=2) if args.json else render(reply))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _ask(args, "reload")
    if reply is None:
        return 1
    if reply.get("ok"):
        print("superd: configuration reloaded")
        return 0
    errors = reply.get("errors") or [reply.get("error")]
    assert isinstance(errors, list)
    for line in errors:
        print(line, file=sys.stderr)
    if reply.get("applied"):
        print(f"superd: configuration reloaded, but {len(errors)} listener(s) failed to "
              "bind (the daemon retries them; see superd status)", file=sys.stderr)
    else:
        print("superd: the daemon refused the new configuration and keeps the running one",
              file=sys.stderr)
    return 1


def cmd_convert(args: argparse.Namespace) -> int:
    from superd.convert import ConvertError, convert

    try:
        print(convert(args.files), end="")
    except ConvertError as e:
        print(f"superd: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from superd.explain import explain, parse_client

    try:
        ip, port = parse_client(args.address)
    except ValueError:
        print(f"superd: '{args.address}' is not ADDR, ADDR:PORT or [V6ADDR]:PORT",
              file=sys.stderr)
        return 2
    cfg = _load(args.config)
    if cfg is None:
        return 1
    svc = cfg.service(args.service)
    if svc is None:
        names = ", ".join(s.name for s in cfg.services) or "none"
        print(f"superd: no service '{args.service}' in {cfg.path} (services: {names})",
              file=sys.stderr)
        return 2
    for line in explain(cfg, svc, ip, port):
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.config)
    cfg = _load(path)
    if cfg is None:
        return 1
    argv = [sys.executable, "-m", "superd", "run", "-c", path]
    if args.pidfile:
        argv += ["--pidfile", args.pidfile]
    if args.daemon:
        return _run_detached(args, path, cfg, argv)
    return _run_foreground(args, path, cfg, argv)


def _refused(e: OSError) -> int:
    """A runtime path superd would not create or open (superd.paths says why)."""
    print(f"superd: {e.strerror or e}", file=sys.stderr)
    return 1


def _run_foreground(args: argparse.Namespace, path: str, cfg: Config,
                    argv: list[str]) -> int:
    from superd import daemonize
    from superd.loop import Daemon
    from superd.spawn import prepare_daemon

    _protect_stdio()
    prepare_daemon()
    settings = cfg.log
    if args.log_target is not None:
        settings = dataclasses.replace(settings, target=args.log_target)
    try:
        logmod.setup(settings)
        if args.pidfile:
            daemonize.write_pidfile(args.pidfile)
    except OSError as e:
        return _refused(e)
    try:
        return Daemon(path, cfg, argv).run()
    finally:
        if args.pidfile:
            daemonize.remove_pidfile_if_mine(args.pidfile)


def _run_detached(args: argparse.Namespace, path: str, cfg: Config,
                  argv: list[str]) -> int:
    from superd import daemonize, paths
    from superd.loop import Daemon
    from superd.spawn import prepare_daemon

    pidfile = args.pidfile or daemonize.default_pidfile()
    settings = cfg.log
    if args.log_target is not None:
        settings = dataclasses.replace(settings, target=args.log_target)
    if settings.target == "stderr":  # nobody reads a daemon's stderr: use syslog
        settings = dataclasses.replace(settings, target="syslog")
    if settings.target == "syslog" and logmod.syslog_handler() is None:
        print(f"superd: --daemon: no syslog listens on {logmod.SYSLOG_SOCKET} here, so "
              "nothing would read superd's log; set log: {file: PATH} (or run in the "
              "foreground under systemd)", file=sys.stderr)
        return 1
    try:
        paths.check_file_place(pidfile)  # before pidfile_holder reads it by name
    except OSError as e:
        return _refused(e)
    holder = daemonize.pidfile_holder(pidfile)
    if holder is not None:
        print(f"superd: already running as pid {holder} (pidfile {pidfile})", file=sys.stderr)
        return 1
    try:
        output = _daemon_output(settings)
    except OSError as e:
        return _refused(e)
    with daemonize.detached(pidfile, output):
        _protect_stdio()
        prepare_daemon()
        logmod.setup(settings)
        successor = [*argv[:6], "--pidfile", pidfile, "--log-target", settings.target]
        return Daemon(path, cfg, successor).run()


def _daemon_output(settings: LogSettings) -> TextIO | None:
    """The log file a detached superd's stdout and stderr go to, opened safely."""
    from superd import paths

    if settings.target == "file" and settings.file:
        return os.fdopen(paths.open_log(settings.file), "a")
    return None


def _protect_stdio() -> None:
    """Keep fds 0-2 open so no socket is ever given one of those numbers, and
    make every other inherited descriptor close-on-exec so no program superd
    starts can inherit it (sockets handed in by LISTEN_FDS are still used)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the directory listing's own descriptor, now closed


if __name__ == "__main__":
    sys.exit(main())
