"""``mount.fuse.fusefs``: what mount(8) runs for ``mount -t fuse.fusefs`` and fstab lines.

mount(8) (util-linux 2.38) looks for the helper in ``/sbin`` (``/sbin/mount.fuse.fusefs``,
then ``/sbin/fs.d``, ``/sbin/fs``; not ``$PATH``) and calls it as::

    mount.fuse.fusefs SOURCE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS]

with ``-s`` sloppy, ``-f`` fake (do nothing), ``-n`` no mtab, ``-v`` verbose, and the options
of the command line or fstab line minus the ``x-*`` ones (``_netdev``, ``nofail``... are passed
on). A helper called under another name may also get ``-t fuse.fusefs``. The environment may
lack ``PATH`` and ``HOME``.

The options are those of ``fusefs mount -o`` (settings as ``key=value``, ``allow_other``,
``ro``, FUSE mount flags; mount(8)-only ones are dropped), plus ``config=FILE``. The helper
daemonizes and returns once the mount answers, with mount(8)'s exit codes: 0 mounted,
1 bad invocation, 32 mount failure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: mount.fuse.fusefs SOURCE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTION[,OPTION...]]"

EX_USAGE = 1  # mount(8): incorrect invocation or permissions
EX_FAIL = 32  # mount(8): mount failure


class _Usage(Exception):
    pass


def parse(argv: Sequence[str]) -> tuple[list[str], list[str], set[str]]:
    """-> (positional arguments, option groups, flags from ``sfnvh``)."""
    positional: list[str] = []
    options: list[str] = []
    flags: set[str] = set()
    it = iter(argv)
    for arg in it:
        if arg in ("-o", "-t", "-N"):
            value = next(it, None)
            if value is None:
                raise _Usage(f"option {arg} needs a value")
            if arg == "-o":
                options.append(value)
            elif arg == "-t":
                _check_type(value)
            else:
                raise _Usage("-N (mount in another namespace) is not supported")
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-t") and len(arg) > 2:
            _check_type(arg[2:])
        elif arg in ("--help", "--fake", "--no-mtab", "--verbose", "--sloppy"):
            flags.add({"--help": "h", "--fake": "f", "--no-mtab": "n"}.get(arg, arg[2]))
        elif arg.startswith("-") and len(arg) > 1 and not arg.startswith("--"):
            unknown = set(arg[1:]) - set("sfnvh")
            if unknown:
                raise _Usage(f"unknown option -{sorted(unknown)[0]}")
            flags.update(arg[1:])
        else:
            positional.append(arg)
    return positional, options, flags


def _check_type(fstype: str) -> None:
    if fstype not in ("fuse.fusefs", "fusefs"):
        raise _Usage(f"this helper mounts fuse.fusefs, not {fstype}")


def fusefs_argv(source: str, mountpoint: str, options: Sequence[str]) -> list[str]:
    """The ``fusefs mount`` command line for a helper call (``config=FILE`` -> ``--config``)."""
    config: list[str] = []
    rest: list[str] = []
    for group in options:
        for opt in filter(None, (o.strip() for o in group.split(","))):
            if opt.startswith("config="):
                config = ["--config", opt.partition("=")[2]]
            else:
                rest.append(opt)
    return ["mount", source, mountpoint, *config, *(["-o", ",".join(rest)] if rest else [])]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        positional, options, flags = parse(args)
        if "h" in flags:
            print(USAGE)
            return 0
        if len(positional) != 2:
            raise _Usage("need SOURCE and MOUNTPOINT")
    except _Usage as exc:
        print(f"mount.fuse.fusefs: {exc}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    source, mountpoint = positional
    # "-s" (sloppy) needs nothing: unknown options reach FUSE, which names the one it refuses;
    # "-n" (no mtab) needs nothing: /etc/mtab is /proc/self/mounts.
    if "f" in flags:  # fake: mount(8) only wants the mount recorded, not made
        return 0
    from . import cli

    try:
        code = cli.main(fusefs_argv(source, mountpoint, options))
    except SystemExit as exc:  # argparse refused the translated command line (one line shown)
        code = 1 if exc.code else 0
    if code != 0:
        return EX_FAIL
    if "v" in flags:
        print(f"mount.fuse.fusefs: {source} mounted on {mountpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
