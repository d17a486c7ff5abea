from conftest import html


async def test_page_composes_fragments_in_order(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>"), "/b": html("<p>B</p>", delay=0.05)})
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment src="{svc.url('/b')}"></fragment>
        <fragment src="{svc.url('/a')}"></fragment>
        </body></html>
    """})
    resp, body = await composer.get("/page")
    assert resp.status == 200
    assert body.index("<p>B</p>") < body.index("<p>A</p>")
