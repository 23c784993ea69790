"""The indexed course files, served read-only so that a student can check a source at its page.

Only the index's own list of documents can be fetched: at start the server reads the documents table of the
index's sidecar and keeps those that are files on disk (JSONL records have no file of their own), each under
an id derived from its key (`GET /documents/{id}`). The client names an id, never a path: anything that is not
one of those ids is a 404, so there is nothing to traverse. PDFs open in the browser's viewer (`#page=N`
jumps to the page); HTML is sandboxed (no script runs on this origin, where the chat page keeps its API key);
other text formats are sent as plain text, anything else as a download. With `--api-key` the same key as the
API is required.
"""

# No `from __future__ import annotations` here: FastAPI reads the route's parameter types at run time, and
# `Request` is imported inside `router()` (fastapi loads only when serving).
import hashlib
import mimetypes
import os
from dataclasses import dataclass
from typing import Callable

ROUTE = "/documents/{doc_id}"
TEXT_SUFFIXES = {".md", ".markdown", ".mdx", ".txt", ".text", ".rst", ".tex", ".ipynb", ".jsonl", ".json"}


def document_id(key: str) -> str:
    """A document's id in URLs: stable while its key (the path it was indexed under) is."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def document_key(passage: dict) -> str | None:
    """The key of the document a passage comes from (its chunk id is `KEY#hash`)."""
    chunk_id = passage.get("id")
    return chunk_id.rsplit("#", 1)[0] if isinstance(chunk_id, str) and "#" in chunk_id else None


@dataclass(frozen=True)
class IndexedFile:
    key: str
    source: str
    path: str


class Documents:
    """The allow-list: document id -> indexed file."""

    def __init__(self, files: list[IndexedFile]):
        self.files = {document_id(f.key): f for f in files}

    @classmethod
    def from_index(cls, index_path: str) -> "Documents":
        from probllm.rag.index import indexed_documents

        return cls([IndexedFile(d["key"], d["source"], d["path"]) for d in indexed_documents(index_path)
                    if d["path"]])

    def link(self, passage: dict) -> str | None:
        """The page-relative address of a passage's file (at its page, for a PDF), or None when it has none."""
        key = document_key(passage)
        doc_id = document_id(key) if key is not None else None
        if doc_id not in self.files:
            return None
        url = ROUTE.format(doc_id=doc_id).lstrip("/")
        page = passage.get("page")
        if page is not None and self.files[doc_id].path.lower().endswith(".pdf"):
            url += f"#page={int(page)}"
        return url

    def router(self, check_key: Callable | None = None):
        """The FastAPI router of `GET /documents/{id}`; `check_key` (a FastAPI dependency, as the /v1 routes take
        it) raises when a key is required and missing or wrong."""
        from fastapi import APIRouter, Depends
        from fastapi.responses import FileResponse, JSONResponse

        router = APIRouter()

        @router.get(ROUTE, include_in_schema=False, dependencies=[Depends(check_key)] if check_key else [])
        async def document(doc_id: str):
            found = self.files.get(doc_id)
            if found is None or not os.path.isfile(found.path):
                from probllm.serve.protocol import error_body

                return JSONResponse(error_body(f"no indexed document '{doc_id}'", code="not_found"), 404)
            return FileResponse(found.path, **_presentation(found.path))

        return router


def _presentation(path: str) -> dict:
    """How a file is sent: its media type, shown in the browser or downloaded, and what it may do there."""
    name = os.path.basename(path)
    suffix = os.path.splitext(name)[1].lower()
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if suffix == ".pdf":
        return {"media_type": "application/pdf", "filename": name, "content_disposition_type": "inline",
                "headers": headers}
    if suffix in (".html", ".htm"):
        # Shown, but as an opaque origin: its scripts cannot run here or read the chat page's storage.
        return {"media_type": "text/html; charset=utf-8", "filename": name, "content_disposition_type": "inline",
                "headers": {**headers, "Content-Security-Policy": "sandbox"}}
    if suffix in TEXT_SUFFIXES:
        return {"media_type": "text/plain; charset=utf-8", "filename": name, "content_disposition_type": "inline",
                "headers": headers}
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return {"media_type": media, "filename": name, "headers": headers}
