module recsys.local/edge

go 1.24
