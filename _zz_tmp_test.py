from _t_e2e import *
def test_zzqq(fake_upstream, ccm_server):
    up = fake_upstream("openai")
    err = {"error": {"message": "Rate limit reached"}}
    up.script(Reply(status=429, json=err, headers={"retry-after-ms": "1500"}),
              Reply(status=429, json=err, headers={"retry-after-ms": "1500"}))
    c = ccm_server(simple_cfg(up, kind="openai"))
    r = post(c, BASIC_REQ)
    print(r.status_code, len(up.seen), len(up.replies))
    t=time.time()
    try:
        sdk(c).messages.create(**BASIC_REQ)
    except Exception as e: print("exc", type(e))
    print(time.time()-t, len(up.seen), len(up.replies), [s.headers for s in up.seen])
    print(c.app.recent)
