"""roff for the man pages: plain text escaped, argparse's text laid out, and the few
building blocks of a hand-written section.

Every piece of text goes through ``escape``: a backslash becomes ``\\e``, a hyphen
``\\-`` (a real minus, so a copied option works), and a line that would start with a dot
or an apostrophe (a request) guarded with ``\\&``.
"""

from __future__ import annotations

import argparse
import errno
import re
from typing import Iterable

GUARD = "\\&"  # zero-width: a text line starting with it is never read as a request
EXAMPLE_INDENT = 4  # ens, for command lines


def escape(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(GUARD + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def is_raw(parser: argparse.ArgumentParser) -> bool:
    """Does ``parser`` print its description and epilog as laid out?"""
    return issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)


def text_block(text: str, raw: bool) -> str:
    """A description or epilog as roff. Not ``raw``: one paragraph, as argparse fills it.
    ``raw``: paragraphs (blank-line separated) of filled text, indented lines kept as
    they are (command lines, tables), as --help shows them."""
    if not raw:
        return escape(" ".join(text.split()))
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text.strip("\n")) if p.strip()]
    return "\n.PP\n".join(_paragraph(p.rstrip().split("\n")) for p in paragraphs)


def _paragraph(lines: list[str]) -> str:
    out, verbatim = [], False
    for line in lines:
        indented = line.startswith((" ", "\t"))
        if indented != verbatim:
            out.append(".nf" if indented else ".fi")
            verbatim = indented
        out.append(escape(line.rstrip()))
    return "\n".join(out + [".fi"] * verbatim)


def synopsis(parser: argparse.ArgumentParser) -> list[str]:
    """argparse's usage (each form, unwrapped) as roff lines, the program in bold."""
    forms: list[str] = []
    for line in parser.format_usage().removeprefix("usage:").strip().split("\n"):
        line = line.strip()
        if line.startswith(parser.prog) or not forms:
            forms.append(line)
        else:  # argparse wrapped the form
            forms[-1] += " " + line
    lines: list[str] = []
    for form in forms:
        args = escape(form.removeprefix(parser.prog).strip())
        lines += [".br", f".B {escape(parser.prog)}", re.sub(r"<[^>]*>", _unbreakable, args)]
    return lines[1:]


def _unbreakable(metavar: re.Match) -> str:
    """``<cow file>`` is never split across lines."""
    return metavar.group().replace(" ", "\\ ")


def section(title: str, *body: str) -> str:
    return "\n".join([f'.SH "{title}"', *body])


def para(text: str) -> str:
    return ".PP\n" + escape(text)


def tagged(items: Iterable[tuple[str, str]]) -> str:
    """A list of tagged paragraphs, each tag in bold."""
    return "\n".join(f".TP\n{bold(tag)}\n{escape(text)}" for tag, text in items)


def verbatim(lines: Iterable[str]) -> str:
    """Lines shown as they are (command lines, a file), indented; "" is a blank line."""
    body = [escape(line) if line else ".sp" for line in lines]
    return "\n".join([f".RS {EXAMPLE_INDENT}", ".nf", *body, ".fi", ".RE"])


def errno_name(number: int) -> str:
    return f"{number} ({errno.errorcode[number]})"
