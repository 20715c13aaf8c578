"""Queries a running `vllm serve` with the openai client (in .venv-vllm, which has it) and
prints what it answered as JSON, for tests/test_vllm_plugin.py.

python tests/vllm_openai_client.py BASE_URL MODEL PROMPT
"""

import json
import sys

from openai import OpenAI


def main() -> None:
    base_url, model, prompt = sys.argv[1:4]
    client = OpenAI(base_url=base_url, api_key="unused")
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=8, temperature=0)
    print(json.dumps({"models": [m.id for m in client.models.list().data],
                      "completion": completion.choices[0].text, "completion_tokens": completion.usage.completion_tokens,
                      "chat": chat.choices[0].message.content, "chat_tokens": chat.usage.completion_tokens}))


if __name__ == "__main__":
    main()
