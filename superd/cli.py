"""Command line: ``superd run``, ``check``, ``status``, ``reload``, ``stop``,
``explain``, ``convert`` and ``--version``.

Only this module prints and chooses exit codes: 0 success, 1 configuration
refused (or the daemon could not be reached, or refused), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import sys
import textwrap
from typing import TextIO

from superd import config as configmod
from superd import log as logmod
from superd.config import Config, LogSettings, Service
from superd.errors import ConfigError

DEFAULT_CONFIG = "/etc/superd/superd.yaml"
STOP_WAIT_MARGIN = 10.0  # seconds `superd stop` waits beyond stop_timeout and kill_grace


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


def package_version(dist: str = "superd") -> str:
    """The version of *dist* from its package metadata; for a checkout run in
    place (never installed), superd's own ``__version__``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        from superd import __version__
        return __version__


class _Version(argparse.Action):
    """``--version``: reads the package metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"superd {package_version()}")
        parser.exit()


# each command: its one-line help, its description, and examples for --help
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("run the daemon in the foreground", """
        Run the daemon: bind a listening socket for each service of FILE and,
        for each client, start the service's program with the connection as
        its stdin and stdout.  In the foreground (what systemd wants) unless
        --daemon.  Ctrl-C or SIGTERM stops it: listeners close at once and
        running programs get stop_timeout seconds; a second Ctrl-C stops them
        now.  SIGHUP reloads FILE; SIGUSR2 hands the sockets to a new superd.""",
        """
        superd run -c /etc/superd/superd.yaml
        superd run --daemon --pidfile /run/superd.pid"""),
    "check": ("validate the configuration and show it", """
        Validate FILE and print what it resolved to: the control socket, the
        global limits and one line per service.  Errors are printed as
        FILE:LINE:COL: message, all of them at once, and the exit status is 1.""",
        """
        superd check -c /etc/superd/superd.yaml"""),
    "status": ("ask the running daemon what it is doing", """
        Ask the running daemon what it is doing: its pid and the file it runs,
        each service's state and counters, and each live connection with its
        program's pid, client, age, CPU time and memory.  The daemon is reached
        through the control socket FILE names; if the daemon there runs another
        file, a note on stderr says so.""",
        """
        superd status
        superd status -c etc/superd.yaml --json"""),
    "reload": ("ask the running daemon to re-read its file", """
        Ask the running daemon to re-read its file, as SIGHUP does, and wait for
        its answer.  It is reached through the control socket FILE names and
        must run FILE itself (compared by real path): a daemon that runs another
        file is left alone (exit 1) unless --any-config is given.  A refused
        file keeps the running configuration; its errors are printed and the
        exit status is 1.""",
        """
        superd reload -c /etc/superd/superd.yaml"""),
    "stop": ("stop the running daemon and wait until it has exited", """
        Ask the running daemon to stop, as SIGTERM does, and wait until it has
        exited: listeners close at once, running programs get stop_timeout
        seconds to finish, then SIGTERM, then SIGKILL after kill_grace.  Run
        superd stop again meanwhile to stop the programs now.  Like reload, it
        acts only on a daemon that runs FILE unless --any-config is given.""",
        """
        superd stop -c /etc/superd/superd.yaml"""),
    "convert": ("print superd YAML for inetd.conf or xinetd files", """
        Print superd YAML for inetd.conf or xinetd files (the format is told by
        content; xinetd's include and includedir are followed).  Whatever cannot
        be carried over is written as a comment beside the service, with the
        reason.""",
        """
        superd convert /etc/inetd.conf > /etc/superd/superd.yaml
        superd convert /etc/xinetd.conf > /etc/superd/superd.yaml"""),
    "explain": ("what would happen to a client at ADDRESS", """
        Say what would happen to a client at ADDRESS connecting to SERVICE:
        allowed or denied and by which rule, the limits and the source group it
        is counted in, the program, its identity and the exact environment it
        would get.  Works on the file alone; no daemon needs to run.""",
        """
        superd explain hello 10.1.2.3
        superd explain -c etc/superd.yaml hello '[2001:db8::1]:5000'"""),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superd", description="An inetd-style superserver.",
        epilog="'superd COMMAND --help' says more about each command; the manual is superd(8).")
    parser.add_argument("--version", action=_Version, help="print superd's version and exit")
    sub = parser.add_subparsers(dest="command")
    cmds = {name: _command(sub, name) for name in _COMMANDS}
    run = cmds["run"]
    run.add_argument("--daemon", action="store_true",
                     help="detach (double fork) instead of running in the foreground")
    run.add_argument("--pidfile", metavar="F",
                     help="write the pid here (with --daemon: a locked pidfile; "
                          "default /run/superd.pid as root)")
    run.add_argument("--log-target", choices=("stderr", "syslog", "file"),
                     help="where the log goes, over the file's log: target "
                          "(a --daemon superd passes it on to its successor)")
    cmds["status"].add_argument("--json", action="store_true",
                                help="print the raw JSON report")
    for name in ("reload", "stop"):
        cmds[name].add_argument(
            "--any-config", action="store_true",
            help=f"{name} whichever daemon answers on the control socket, "
                 "whatever file it runs")
    cmds["convert"].add_argument(
        "files", nargs="+", metavar="FILE",
        help="inetd.conf or xinetd files (xinetd.conf follows includedir)")
    cmds["explain"].add_argument("service", metavar="SERVICE", help="a service name in FILE")
    cmds["explain"].add_argument("address", metavar="ADDRESS",
                                 help="ADDR, ADDR:PORT or [V6ADDR]:PORT")
    return parser


def _command(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """The subcommand *name*, with its help, description, examples and -c."""
    short, description, examples = _COMMANDS[name]
    cmd = sub.add_parser(name, help=short,
                         description=textwrap.dedent(description).strip(),
                         epilog="examples:\n" + textwrap.indent(
                             textwrap.dedent(examples).strip(), "  "),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    if name != "convert":
        cmd.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                         help=f"configuration file (default {DEFAULT_CONFIG})")
    cmd.set_defaults(func=globals()[f"cmd_{name}"])
    return cmd


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


def _ask(path: str, command: str, config: str | None = None) -> dict[str, object] | None:
    """The reply of the daemon on control socket *path*, or None (said why)."""
    from superd.control import NotRunning, request
    from superd.paths import UnsafePath

    try:
        return request(path, command, config=config)
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
    from superd.control import OtherFile, check_file
    from superd.status import add_usage, render

    path = _control_path(args.config)
    reply = _ask(path, "status")
    if reply is None:
        return 1
    if not reply.get("ok"):
        print(f"superd: {reply.get('error')}", file=sys.stderr)
        return 1
    try:
        check_file(path, reply, os.path.abspath(args.config))
    except OtherFile as e:  # status changes nothing: say whose it is, and show it
        print(f"superd: note: {e}", file=sys.stderr)
    add_usage(reply)  # here, not in the daemon: walking /proc would stall its loop
    print(json.dumps(reply, indent=2) if args.json else render(reply))
    return 0


def _confirmed(args: argparse.Namespace, command: str,
               verb: str) -> tuple[str, dict[str, object]] | None:
    """The control socket and status report of the daemon to send *command*
    to, once it is known to run ``-c FILE``; or None, having said why not.

    Asking ``status`` first works with a daemon of any protocol (its report
    always names its pid and file); a protocol 2 daemon checks once more
    when it gets the command itself (see superd.control)."""
    from superd.control import OtherFile, check_file

    path = _control_path(args.config)
    report = _ask(path, "status")
    if report is None:
        return None
    if not report.get("ok"):
        print(f"superd: {report.get('error')}", file=sys.stderr)
        return None
    if not args.any_config:
        try:
            check_file(path, report, os.path.abspath(args.config))
        except OtherFile as e:
            print(f"superd: not {verb}: {e}", file=sys.stderr)
            reach = f"give -c {e.theirs} to reach that daemon, or " if isinstance(
                e.theirs, str) else "use "
            print(f"superd: {reach}--any-config to {command} it anyway", file=sys.stderr)
            return None
    return path, report


def _send(args: argparse.Namespace, command: str, verb: str,
          path: str) -> dict[str, object] | None:
    """Send *command* (with ``config``: the daemon acts only if it runs -c FILE)."""
    meant = None if args.any_config else os.path.abspath(args.config)
    reply = _ask(path, command, config=meant)
    if reply is not None and reply.get("wrong_config"):
        print(f"superd: not {verb}: {reply.get('error')}", file=sys.stderr)
        return None
    return reply


def cmd_reload(args: argparse.Namespace) -> int:
    found = _confirmed(args, "reload", "reloading")
    if found is None:
        return 1
    path, report = found
    reply = _send(args, "reload", "reloading", path)
    if reply is None:
        return 1
    if reply.get("ok"):
        pid, config = reply.get("pid", report.get("pid")), reply.get("config", report.get("config"))
        print(f"superd: superd {pid} reloaded {config}")
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


def cmd_stop(args: argparse.Namespace) -> int:
    from superd.control import wait_gone

    found = _confirmed(args, "stop", "stopping")
    if found is None:
        return 1
    path, report = found
    reply = _send(args, "stop", "stopping", path)
    if reply is None:
        return 1
    if not reply.get("ok"):
        print(f"superd: {reply.get('error')}", file=sys.stderr)
        return 1
    pid = reply.get("pid", report.get("pid"))
    if not isinstance(pid, int):
        print(f"superd: the daemon on {path} is stopping, but did not say its pid: "
              "not waiting for it", file=sys.stderr)
        return 1
    print(_stopping_text(pid, reply, report), flush=True)
    stop_timeout = _number(reply.get("stop_timeout", report.get("stop_timeout")), 10.0)
    grace = _number(reply.get("kill_grace"), 5.0)
    limit = (0.0 if reply.get("again") else stop_timeout) + grace + STOP_WAIT_MARGIN
    try:
        gone = wait_gone(pid, limit)
    except KeyboardInterrupt:
        print(f"\nsuperd: no longer waiting; superd {pid} goes on stopping (`superd stop` "
              "again stops its programs now)", file=sys.stderr)
        return 1
    if not gone:
        print(f"superd: superd {pid} still runs after {limit:g} s; see its log",
              file=sys.stderr)
        return 1
    print(f"superd: superd {pid} stopped")
    return 0


def _stopping_text(pid: int, reply: dict[str, object], report: dict[str, object]) -> str:
    """What `superd stop` says the daemon does now."""
    programs = reply.get("programs")
    count = f"{programs} program" + ("" if programs == 1 else "s")
    if reply.get("again"):
        if not programs:
            return f"superd: superd {pid} was already stopping"
        return (f"superd: superd {pid} was already stopping; its {count} get "
                f"{reply.get('signal', 'SIGTERM')} now")
    text = f"superd: stopping superd {pid} ({reply.get('config', report.get('config'))})"
    if isinstance(programs, int) and programs > 0:
        text += (f": waiting up to {_number(reply.get('stop_timeout'), 10.0):g} s for "
                 f"{count}; `superd stop` again stops them now")
    return text


def _number(value: object, default: float) -> float:
    return float(value) if isinstance(value, int | float) else default


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
