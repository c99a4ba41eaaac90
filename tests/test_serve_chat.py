"""POST /v1/chat/completions on an artifact whose tokenizer_config.json has a chat template.

The artifact is the demo one with a template added (as an exporter would carry it from a
checkpoint; the manifest is re-stamped so the default sha256 load accepts it). The oracle for the
rendering is the prompt text written out by hand here, and for the reply `Model.generate` on that
text's ids: the chat endpoint must be exactly the completions path on the rendered prompt.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("jinja2", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")

import runtime  # noqa: E402
from runtime.errors import RuntimeArtifactError  # noqa: E402
from runtime.integrity import sha256_file  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.background import BackgroundServer  # noqa: E402
from runtime.serve.chat import ChatTemplate  # noqa: E402

NAME = "demo-chat"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.first %}{{ raise_exception('the first message cannot be the assistant') }}{% endif %}"
    "{{ m['role'] | upper }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Speak as in the play."}, {"role": "user", "content": "ROMEO:"}]
RENDERED = "<s>SYSTEM: Speak as in the play.\nUSER: ROMEO:\nASSISTANT:"  # by hand, from TEMPLATE


def with_template(src: Path, dst: Path, template) -> Path:
    """A copy of the artifact whose tokenizer_config.json carries `template`, manifest re-stamped."""
    shutil.copytree(src, dst)
    tc_path = dst / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update(chat_template=template, bos_token="<s>")
    tc_path.write_text(json.dumps(tc))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["tokenizer_config.json"] = {"size": tc_path.stat().st_size, "sha256": sha256_file(tc_path)}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    from demo import demo_artifact

    return with_template(demo_artifact("arith"), tmp_path_factory.mktemp("chat") / "art", TEMPLATE)


@pytest.fixture(scope="module")
def model(chat_dir):
    return runtime.load(chat_dir, provider="cpu", graph="kv", threads=1)


@pytest.fixture(scope="module")
def client(model):
    with BackgroundServer(create_app(model, name=NAME, max_batch=4)) as s:
        yield openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(model, n: int) -> str:
    ids = model.tokenizer.encode(RENDERED, add_special_tokens=False).ids
    return model.generate(ids, max_new_tokens=n).text


def test_chat_reply_is_generate_on_the_rendered_prompt(client, model):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason == "length"
    assert c.message.content == expected(model, 24)
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(RENDERED, add_special_tokens=False).ids)
    assert r.usage.completion_tokens == 24


def test_chat_stream_deltas_add_up_to_the_same_reply(client, model):
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=16,
                                                 temperature=0, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected(model, 16)


def test_chat_refusals(client):
    with pytest.raises(openai.BadRequestError, match="first message cannot be the assistant") as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "hi"}], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"  # still serving


def test_named_templates_and_special_tokens():
    t = ChatTemplate.of({"chat_template": [{"name": "tool_use", "template": "T"},
                                           {"name": "default", "template": "{{ eos_token }}{{ messages[0]['content'] }}"}],
                         "eos_token": {"content": "</s>", "lstrip": False}})
    from runtime.serve.chat import ChatMessage

    assert t.render([ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]) \
        == "</s>ab"
    assert ChatTemplate.of({}) is None and ChatTemplate.of({"chat_template": "  "}) is None


def test_a_template_that_does_not_compile_fails_at_start(tmp_path):
    from demo import demo_artifact

    bad = with_template(demo_artifact("arith"), tmp_path / "bad", "{% for m in messages %}")
    m = runtime.load(bad, provider="cpu", graph="kv", threads=1)
    with pytest.raises(RuntimeArtifactError, match="chat_template is not valid Jinja"):
        create_app(m, name=NAME)


def test_export_carries_chat_template_jinja(tmp_path):
    """Newer checkpoints keep the template in chat_template.jinja; the artifact keeps it in
    tokenizer_config.json, where the server reads it."""
    from export.artifact import copy_tokenizer
    from export.writer import ArtifactWriter

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    with ArtifactWriter(tmp_path / "out") as w:
        copy_tokenizer(w, ckpt)
        assert json.loads(w.path("tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert not (ckpt / "tokenizer_config.json").read_text().count("chat_template")  # the checkpoint untouched
