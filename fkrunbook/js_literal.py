"""Parse and print objects the way Deno's console prints them in the function logs."""

from __future__ import annotations

import json
import re


class LiteralError(ValueError):
    """A console-printed object could not be parsed; the message gives the offset."""


_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$]*")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?n?")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f",
                   "v": "\v", "0": "\0"}
_KEYWORDS = {"null": None, "undefined": None, "true": True, "false": False}
_QUOTES = "'\"`"
# Deno prints nested values past its depth limit as [Object], [Array] and the like.
_DEPTH_MARKER = re.compile(r"\s*([A-Za-z][\w :$.*-]*)\]")


class _LiteralParser:
    """Recursive-descent parser for objects as Deno's console prints them.

    Keys may be bare identifiers or quoted. Strings use ', " or `, and
    values may be null, undefined, booleans, numbers, arrays and nested
    objects. Deno's ``[Object]`` and ``[Array]`` depth markers become plain
    strings. Error messages give offsets only, never the text, because it
    may contain a phone number.
    """

    def __init__(self, text: str, position: int = 0):
        self.text = text
        self.position = position

    def fail(self, what: str):
        raise LiteralError(f"{what} at offset {self.position}")

    def skip_space(self) -> None:
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.position] if self.position < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"expected {char!r}")
        self.position += 1

    def value(self):
        char = self.peek()
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        if char and char in _QUOTES:
            return self.concatenated_string()
        number = _NUMBER.match(self.text, self.position)
        if number:
            self.position = number.end()
            literal = number.group().rstrip("n")
            return float(literal) if any(c in literal for c in ".eE") else int(literal)
        word = _IDENTIFIER.match(self.text, self.position)
        if word and word.group() in _KEYWORDS:
            self.position = word.end()
            return _KEYWORDS[word.group()]
        self.fail("expected a value" if char else "unexpected end of text")

    def object(self) -> dict:
        self.expect("{")
        result = {}
        while self.peek() != "}":
            key = self.key()
            self.expect(":")
            result[key] = self.value()
            if self.peek() == ",":
                self.position += 1
            elif self.peek() != "}":
                self.fail("expected ',' or '}'")
        self.position += 1
        return result

    def key(self) -> str:
        char = self.peek()
        if char and char in _QUOTES:
            return self.string()
        match = _IDENTIFIER.match(self.text, self.position) or \
            _NUMBER.match(self.text, self.position)
        if not match:
            self.fail("expected a property name")
        self.position = match.end()
        return match.group()

    def array(self) -> list | str:
        self.expect("[")
        marker = _DEPTH_MARKER.match(self.text, self.position)
        if marker and marker.group(1).strip() not in _KEYWORDS:
            self.position = marker.end()
            return f"[{marker.group(1)}]"
        items = []
        while self.peek() != "]":
            items.append(self.value())
            if self.peek() == ",":
                self.position += 1
            elif self.peek() != "]":
                self.fail("expected ',' or ']'")
        self.position += 1
        return items

    def concatenated_string(self) -> str:
        # Older inspectors split long strings as 'abc' +\n 'def'.
        parts = [self.string()]
        while self.peek() == "+":
            self.position += 1
            if not self.peek() or self.peek() not in _QUOTES:
                self.fail("expected a string after '+'")
            parts.append(self.string())
        return "".join(parts)

    def string(self) -> str:
        self.skip_space()
        quote = self.text[self.position]
        start = self.position
        self.position += 1
        chars = []
        while self.position < len(self.text):
            char = self.text[self.position]
            if char == quote:
                self.position += 1
                return "".join(chars)
            if char == "\\":
                chars.append(self.escape())
                continue
            chars.append(char)
            self.position += 1
        self.position = start
        self.fail("unterminated string")

    def escape(self) -> str:
        code = self.text[self.position + 1:self.position + 2]
        self.position += 2
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code]
        if code in ("x", "u"):
            width = 2 if code == "x" else 4
            if code == "u" and self.text.startswith("{", self.position):
                end = self.text.find("}", self.position)
                if end < 0:
                    self.fail("invalid escape sequence")
                digits, self.position = self.text[self.position + 1:end], end + 1
            else:
                digits = self.text[self.position:self.position + width]
                self.position += width
            try:
                return chr(int(digits, 16))
            except ValueError:
                self.fail("invalid escape sequence")
        return code


def parse_js_object(text: str, start: int = 0) -> dict:
    """Parse the console-printed object that starts at or after ``start``.

    Raises ``LiteralError`` when no object follows or it is malformed.
    Text after the closing brace is ignored.
    """
    parser = _LiteralParser(text, start)
    if parser.peek() != "{":
        parser.fail("expected '{'")
    return parser.object()


def _js_string(value: str) -> str:
    if '"' in value and "'" not in value:
        return f"'{value}'"
    return json.dumps(value, ensure_ascii=False)


def format_js_object(payload: dict, multiline: bool = False) -> str:
    """Return ``payload`` printed the way Deno's console prints an object."""
    items = [f"{key}: {'null' if value is None else _js_string(str(value))}"
             for key, value in payload.items()]
    if multiline:
        return "{\n" + ",\n".join(f"  {item}" for item in items) + "\n}"
    return "{ " + ", ".join(items) + " }"
