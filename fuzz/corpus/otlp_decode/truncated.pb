
Ï
9

service.name
shop


dcs.stream
shop.payments‘

app1.0	
libÎ	Mì&Š~ERROR*j2h

msg
payment "failed" Ã¼

codeÖÿÿÿÿÿÿÿÿ

r