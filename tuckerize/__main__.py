from tuckerize.cli import app

app()
