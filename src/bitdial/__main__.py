from bitdial.cli.main import app

app(prog_name="bitdial")
