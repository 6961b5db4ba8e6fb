echo "testing app ($1, shard $2)"
