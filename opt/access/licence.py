"""The licence a gated release is published under unless `access.licence_file` names another text.

Modelled on the terms OPT-175B was released under (non-commercial research use, personal to the grantee, no
redistribution, revocable); it is this platform's default wording, not Meta's licence text.
"""

from __future__ import annotations

from pathlib import Path

from opt.access.errors import AccessError

DEFAULT_LICENCE = """\
Research licence for gated model weights (non-commercial)

1. Use. You may use these weights and any derivative of them only for non-commercial research: study,
   evaluation and publication of results. Any commercial use, and any use in a product or service, is not
   licensed.
2. Personal. This licence is granted to you, the person named on the approved access request, for the
   purpose you stated. It does not extend to your colleagues or your organisation; each applies on their own.
3. No redistribution. You may not share, publish or re-host the weights, in whole or in part, nor any file
   from which they can be recovered (fine-tuned or quantised copies included).
4. Security. Keep the weights on systems only you and the administrators of those systems can read, and
   delete them when your research ends or when this licence ends.
5. Attribution. Cite the model and its release in work that uses it.
6. Revocation. Access may be revoked at any time; on revocation or expiry of your grant this licence ends
   and you must delete every copy.
7. No warranty. The weights are provided as is, without warranty of any kind; they may produce harmful,
   biased or false text, and you are responsible for how you use them.
"""


def licence_text(path: str | None) -> str:
    """The licence to publish with: the file at `path`, or the default."""
    if not path:
        return DEFAULT_LICENCE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AccessError(f"access.licence_file {path}: cannot be read ({e}); point it at a UTF-8 text file") from None
    if not text.strip():
        raise AccessError(f"access.licence_file {path} is empty; a gated release needs the text of its licence")
    return text
