import pytest

from model_store.errors import InvalidReferenceError
from model_store.refs import ModelRef, parse_ref, validate_alias, validate_name


@pytest.mark.parametrize(
    "text, expected",
    [
        ("gpt2", ModelRef("gpt2", "latest")),
        ("gpt2@latest", ModelRef("gpt2", "latest")),
        ("gpt2@3", ModelRef("gpt2", "3")),
        ("gpt2@03", ModelRef("gpt2", "3")),
        ("gpt2@prod", ModelRef("gpt2", "prod")),
        ("my-model_v2.1@staging", ModelRef("my-model_v2.1", "staging")),
    ],
)
def test_valid_references(text, expected):
    assert parse_ref(text) == expected


def test_version_property():
    assert parse_ref("m@7").version == 7
    assert parse_ref("m@prod").version is None
    assert parse_ref("m").version is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("../x", "invalid model name '../x'"),
        ("/abs/path", "invalid model name '/abs/path'"),
        ("a/b", "invalid model name 'a/b'"),
        (".hidden", "invalid model name"),
        ("x@", "nothing after '@'"),
        ("x@0", "versions start at 1"),
        ("x@-1", "invalid alias"),
        ("@3", "model name is empty"),
        ("x@bad alias", "invalid alias"),
        ("x@../../etc", "invalid alias"),
        ("x@1@2", "invalid alias"),
    ],
)
def test_invalid_references_name_the_problem(text, fragment):
    with pytest.raises(InvalidReferenceError) as err:
        parse_ref(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize("alias", ["latest", "3", "", "-x", "a/b", "x" * 65])
def test_invalid_aliases(alias):
    with pytest.raises(InvalidReferenceError):
        validate_alias(alias)


def test_names_cannot_escape_the_root():
    for name in ["..", ".", "a/..", "x\\y", "x" * 101, "nul\0"]:
        with pytest.raises(InvalidReferenceError):
            validate_name(name)
