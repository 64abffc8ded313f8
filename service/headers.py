"""Security headers: X-Content-Type-Options on every answer; on HTML pages a Content-Security-Policy that runs only
the page's own scripts and styles (a nonce per answer) and forbids framing, with X-Frame-Options for old browsers."""

from __future__ import annotations

import secrets

from flask import Flask, Response, g

# Pages load their photos from this origin (the query photo as a data: URL) and post their forms to it; nothing
# else. A script or style element runs only with the answer's nonce, and style attributes not at all.
PAGE_POLICY = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def csp_nonce() -> str:
    """This answer's nonce, for the templates' <script nonce> and <style nonce>: new for every request."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(18)
    return g.csp_nonce


def add_security_headers(app: Flask) -> None:
    """Send the headers on every answer of `app`, error pages included."""
    app.jinja_env.globals["csp_nonce"] = csp_nonce

    @app.after_request
    def security_headers(response: Response) -> Response:
        # No answer is read as another type than it says: an uploaded photo is never run as a script or page.
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.mimetype == "text/html":
            response.headers["Content-Security-Policy"] = PAGE_POLICY.format(nonce=csp_nonce())
            response.headers["X-Frame-Options"] = "DENY"
        return response
