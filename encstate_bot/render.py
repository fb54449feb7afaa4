"""Replies for humans: a plain-text body that reads well on its own, and the same as HTML with
compact tables (commonmark, which maubot uses for markdown, has no tables)."""

from __future__ import annotations

from html import escape
from typing import Iterable, Sequence

from mautrix.types import Format, MessageType, TextMessageEventContent

MAX_CELL = 60


def cell(value: object, limit: int = MAX_CELL) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_id(value: str | None, keep: int = 10) -> str:
    if not value:
        return "-"
    return value if len(value) <= keep + 1 else value[:keep] + "…"


class Reply:
    def __init__(self, title: str | None = None) -> None:
        self._plain: list[str] = []
        self._html: list[str] = []
        if title:
            self.heading(title)

    def heading(self, text: str) -> Reply:
        self._plain.append(f"**{text}**")
        self._html.append(f"<p><strong>{escape(text)}</strong></p>")
        return self

    def line(self, text: str, html: str | None = None) -> Reply:
        self._plain.append(text)
        self._html.append(f"<p>{html if html is not None else escape(text)}</p>")
        return self

    def facts(self, pairs: Iterable[tuple[str, str]]) -> Reply:
        """Label: value lines."""
        pairs = list(pairs)
        self._plain.append("\n".join(f"- {label}: {value}" for label, value in pairs))
        items = "".join(
            f"<li><strong>{escape(label)}</strong>: {escape(value)}</li>" for label, value in pairs
        )
        self._html.append(f"<ul>{items}</ul>")
        return self

    def bullets(self, items: Iterable[str]) -> Reply:
        items = list(items)
        self._plain.append("\n".join(f"- {item}" for item in items))
        self._html.append("<ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>")
        return self

    def table(
        self, headers: Sequence[str], rows: Iterable[Sequence[object]], limit: int = MAX_CELL
    ) -> Reply:
        body = [[cell(v, limit) for v in row] for row in rows]
        if not body:
            return self
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
        self._plain.append(
            "\n".join(
                "  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip()
                for r in [list(headers), ["-" * w for w in widths], *body]
            )
        )
        head = "".join(f"<th>{escape(h)}</th>" for h in headers)
        trs = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in r) + "</tr>" for r in body)
        self._html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        return self

    def warn_first(self, text: str) -> Reply:
        """Put a warning above everything else (what stops the bot from working)."""
        self._plain.insert(0, f"⚠️ {text}")
        self._html.insert(0, f"<p><strong>⚠️ {escape(text)}</strong></p>")
        return self

    @property
    def plain(self) -> str:
        return "\n\n".join(self._plain)

    @property
    def html(self) -> str:
        return "".join(self._html)

    def content(self) -> TextMessageEventContent:
        content = TextMessageEventContent(
            msgtype=MessageType.NOTICE,
            body=self.plain,
            format=Format.HTML,
            formatted_body=self.html,
        )
        # Replies echo what users typed ("@room", user IDs): an empty m.mentions tells clients
        # that the bot means to mention nobody.
        content["m.mentions"] = {}
        return content
