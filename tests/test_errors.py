"""An error that wraps another keeps its cause in its one line (errors.cause_line)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from ldmflow.errors import cause_line

WORDS = st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="'\"}[]"), min_size=1,
                max_size=30).filter(str.strip)


@given(strerror=WORDS, filename=WORDS | st.none(), wrapper=WORDS)
def test_the_os_error_in_the_chain_is_said_with_its_file(strerror, filename, wrapper):
    try:
        try:
            raise OSError(28, strerror, filename)
        except OSError as inner:
            raise RuntimeError(f"{wrapper}:\n  details below") from inner
    except RuntimeError as error:
        line = cause_line(error)
    assert line == strerror + (f": {filename}" if filename else "")


@given(head=WORDS, tail=WORDS)
def test_a_message_whose_cause_follows_a_colon_keeps_it_on_one_line(head, tail):
    line = cause_line(ValueError(f"{head}:\n{tail}"))
    assert "\n" not in line and " ".join(tail.split()) in line


def test_an_errno_quoted_in_the_text_is_the_cause():
    error = ValueError("The following failures occurred while downloading one or more artifacts from file:///s:\n"
                       "{'w.bin': \"[Errno 28] No space left on device: '/d/w.bin'\"}")
    assert cause_line(error) == "[Errno 28] No space left on device: '/d/w.bin'"
