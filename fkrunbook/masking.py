"""Mask phone numbers, message texts and customer names for display and saved results."""

from __future__ import annotations


def mask_phone(phone) -> str | None:
    """Return ``phone`` with all but its first and last four characters starred.

    Numbers of eight characters or fewer keep only their last two.
    """
    if phone is None:
        return None
    text = str(phone)
    if len(text) > 8:
        return text[:4] + "*" * (len(text) - 8) + text[-4:]
    if len(text) > 2:
        return "*" * (len(text) - 2) + text[-2:]
    return "*" * len(text)


def mask_message(message) -> str | None:
    """Return the length of a message text in place of the text."""
    if message is None:
        return None
    return f"[{len(str(message))} chars]"


def mask_name(name) -> str:
    """Return a customer name as its initials, such as ``M. D.``."""
    if not name:
        return "(unknown)"
    return " ".join(f"{part[0].upper()}." for part in str(name).split())
