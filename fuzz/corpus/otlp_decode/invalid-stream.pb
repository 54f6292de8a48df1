
é
5

service.name
shop


dcs.stream
	Not ValidU

app1.0	
lib	Äê&ä~*
line 1'https://opentelemetry.io/schemas/1.24.0