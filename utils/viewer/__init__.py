"""The viewer page at `GET /`: plain HTML, CSS and a small script that call the HTTP API from the browser."""
