"""serq_ao.messages.one_line: a quoted library error is whole, on one line."""

from serq_ao.messages import one_line


def test_a_long_message_is_never_cut():
    # messages were cut at 160 or 240 characters, mid-word ("sentencep")
    words = [f"word{i}" for i in range(200)]
    text = one_line(ValueError("\n".join(words)))
    assert text == " ".join(words) and len(text) > 240


def test_bare_messages_name_their_exception():
    assert one_line(KeyError("model.layers.0")) == "KeyError: 'model.layers.0'"
    assert one_line(RuntimeError()) == "RuntimeError"
