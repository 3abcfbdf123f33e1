"""Every schema of the corpus, through the server and the openai SDK on the real model: outputs validate."""

import json

import jsonschema
import pytest

from tests.conftest import Server
from tests.schemas import CORPUS

FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.mark.model
@pytest.mark.parametrize(("name", "schema", "strict"), CORPUS, ids=[c[0] for c in CORPUS])
def test_output_validates(server: Server, name: str, schema: dict, strict: bool) -> None:
    client = server.client()
    completion = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": f"Give an example of a {name.replace('_', ' ')} as JSON "
                                              f"matching this schema: {json.dumps(schema)}"}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}},
        max_tokens=400,
        temperature=0,
        # A 135M model left greedy can repeat a token forever; the penalty lets it close its strings and
        # numbers within max_tokens (and stop nesting a schema that may nest forever). Validity itself comes
        # from the grammar alone.
        frequency_penalty=1.0 if name.startswith("recursive") else 0.5,
        # A seeded request alone on the server starts from an empty cache: the same logits to the last bit
        # whatever ran before (greedy paths of a tiny model flip on last-bit differences).
        seed=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), schema, format_checker=FORMATS)
