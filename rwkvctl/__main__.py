from rwkvctl.cli import app

app()
