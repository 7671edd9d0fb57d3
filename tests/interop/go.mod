module outbound-relay/interop

go 1.21
