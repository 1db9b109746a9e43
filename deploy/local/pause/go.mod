module modelapp.io/pause

go 1.22
