"""A small HTTP client for a running OpenAI-compatible server (tunepipe serve or vLLM): chat,
and the runtime adapter load/unload endpoints both engines answer."""

from __future__ import annotations

from tunepipe.tasks.core.secrets import redact_url, url_parts
from tunepipe.tasks.core.stage import StageFailed


class ServerError(RuntimeError):
    """A request to the server failed or was refused."""


def load_payload(name: str, path: str) -> dict[str, str]:
    return {"lora_name": name, "lora_path": path}


class ServerClient:
    """The OpenAI-compatible server's adapter endpoints (vLLM's names) and one chat request."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        import httpx

        self.url = redact_url(url)  # for messages; requests use the resolved base and its query
        self.api_key = api_key
        self.timeout = timeout
        self._base, self._query = url_parts(url, "server_url")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self._base, params=self._query, headers=headers, timeout=timeout)

    def served(self) -> dict[str, str]:
        """{model id: root} of what the server serves now (adapters' root is their directory)."""
        import httpx

        try:
            response = self.http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise StageFailed(f"deploy: server {self.url} is not reachable ({exc.__class__.__name__}: {exc}); nothing was changed") from None
        if response.status_code != 200:
            raise StageFailed(f"deploy: server {self.url} answered GET /v1/models with {response.status_code}: {response.text[:300]}")
        return {card["id"]: card.get("root") for card in response.json().get("data", [])}

    def swap(self, name: str, path: str) -> None:
        """Serve the adapter at `path` under `name`: unload what has that name, then load (vLLM refuses a loaded name)."""
        self.unload(name)
        self._post("/v1/load_lora_adapter", load_payload(name, path))

    def unload(self, name: str) -> None:
        """Stop serving `name` (nothing to do when the server does not serve it)."""
        if name in self.served():
            self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def chat(self, model: str, prompt: str, max_tokens: int) -> str:
        import openai

        client = openai.OpenAI(base_url=f"{self._base}/v1", api_key=self.api_key or "none", max_retries=0, timeout=self.timeout,
                               default_query=self._query or None)
        try:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
            )
        except openai.OpenAIError as exc:
            raise ServerError(f"chat request to {model} failed: {exc}") from None
        return reply.choices[0].message.content or ""

    def _post(self, path: str, payload: dict[str, str]) -> None:
        import httpx

        try:
            response = self.http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise ServerError(f"POST {path} {payload}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code != 200:
            raise ServerError(f"POST {path} {payload} answered {response.status_code}: {response.text[:300]}")
